// The LIF neuron alone on the CPU (after a convolution, a pooling layer or any other per-step
// layer): the membrane recurrence fused over time, and its reverse-time backward.
//
// Forward: one task per batch element walks t = 0..T-1 over the N neurons of a row
// current[t, b, :], so every read and write is a contiguous row. Sparse mode records the active
// entries (|V - threshold| < b_th) in (t, j) order per batch element, then concatenates them in
// batch order: rows b*T + t are then a CSR. Backward: one task per (batch element, block of
// neurons) walks t = T-1..0 keeping G for its block in a small buffer. No reduction crosses tasks,
// so results do not depend on the number of threads.
#include <torch/library.h>

#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "low_precision.h"

#include "cpu/cpu_common.h"
#include "cpu/neuron_rows.h"
#include "cpu/row_kernels.h"
#include "cpu/tiled_backward.h"

namespace sparsegrad {
namespace cpu {
namespace {

using NeuronOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                 at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The SpikingJelly-specific settings of the op (dynamics != kChargeLeaky).
struct SJParams {
  int dynamics = kChargeLeaky;
  double tau = 2.0, v_reset = 0.0;
  bool detach_reset = true;
};

// Spikes of one row as bits: word w holds neurons 32w .. 32w+31 (bit k = neuron 32w + k).
template <typename acc_t>
inline void pack_bits(const acc_t* s, int64_t n, int32_t* words) {
  for (int64_t w = 0; w * 32 < n; ++w) {
    const int64_t j0 = w * 32, j1 = std::min(n, j0 + 32);
    uint32_t word = 0;
    for (int64_t j = j0; j < j1; ++j) word |= static_cast<uint32_t>(s[j] > acc_t(0)) << (j - j0);
    words[w] = static_cast<int32_t>(word);
  }
}

#if defined(__AVX512F__)
// The same words from 16-lane compares (float rows: the SpikingJelly path packs every row).
inline void pack_bits(const float* s, int64_t n, int32_t* words) {
  const __m512 zero = _mm512_setzero_ps();
  int64_t w = 0;
  for (; (w + 1) * 32 <= n; ++w) {
    const uint32_t lo = _mm512_cmp_ps_mask(_mm512_loadu_ps(s + 32 * w), zero, _CMP_GT_OQ);
    const uint32_t hi = _mm512_cmp_ps_mask(_mm512_loadu_ps(s + 32 * w + 16), zero, _CMP_GT_OQ);
    words[w] = static_cast<int32_t>(lo | (hi << 16));
  }
  if (w * 32 < n) {
    uint32_t word = 0;
    for (int64_t j = w * 32; j < n; ++j) word |= static_cast<uint32_t>(s[j] > 0.f) << (j - w * 32);
    words[w] = static_cast<int32_t>(word);
  }
}
#endif

inline bool bit_set(const int32_t* words, int64_t j) { return test_bit(words, j); }

// The surrogate of every neuron of a row (dense mode).
template <int kKind, class Param, typename scalar_t, typename acc_t>
inline void surrogate_row(int64_t n, const acc_t* __restrict__ h, scalar_t* __restrict__ out,
                          Param threshold, acc_t slope) {
  for (int64_t j = 0; j < n; ++j)
    out[j] = static_cast<scalar_t>(math::surrogate(h[j], threshold[j], slope, kKind));
}

template <class Param, typename scalar_t, typename acc_t>
inline void surrogate_row(int kind, int64_t n, const acc_t* h, scalar_t* out, Param threshold,
                          acc_t slope) {
  switch (kind) {
    case kAtan: return surrogate_row<kAtan>(n, h, out, threshold, slope);
    case kSigmoid: return surrogate_row<kSigmoid>(n, h, out, threshold, slope);
    case kTriangle: return surrogate_row<kTriangle>(n, h, out, threshold, slope);
    default: return surrogate_row<kFastSigmoid>(n, h, out, threshold, slope);
  }
}

// The active neurons of a row (|h - threshold| < b_th), ascending, into idx; returns how many.
// Branch-free: every index is written, the position advances only on active ones.
template <class Param, typename acc_t>
inline int64_t active_row(int64_t n, const acc_t* __restrict__ h, int32_t* __restrict__ idx,
                          Param threshold, acc_t b_th) {
  int64_t k = 0;
  for (int64_t j = 0; j < n; ++j) {
    idx[k] = static_cast<int32_t>(j);
    k += math::is_active(h[j], threshold[j], b_th) ? 1 : 0;
  }
  return k;
}

#if defined(__AVX512F__)
// float32: 16 neurons at a time, the test as a mask and the active indices compressed in a
// register, stored whole (idx needs 16 entries of room past the count). The same test as
// math::is_active (|h - threshold| < b_th, false for NaN).
inline __m512 param16(const ScalarParam<float>& p, int64_t, __mmask16) { return _mm512_set1_ps(p.value); }
inline __m512 param16(const RowParam<float>& p, int64_t j, __mmask16 m) {
  return _mm512_maskz_loadu_ps(m, p.ptr + j);
}

template <class Param>
inline int64_t active_row(int64_t n, const float* __restrict__ h, int32_t* __restrict__ idx,
                          Param threshold, float b_th) {
  const __m512 bth = _mm512_set1_ps(b_th);
  __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i step = _mm512_set1_epi32(16);
  int64_t k = 0;
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 valid = n - j >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (n - j)) - 1u);
    const __m512 u = _mm512_abs_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(valid, h + j),
                                                 param16(threshold, j, valid)));
    const __mmask16 m = _mm512_mask_cmp_ps_mask(valid, u, bth, _CMP_LT_OQ);
    _mm512_storeu_si512(idx + k, _mm512_maskz_compress_epi32(m, lane));
    k += __builtin_popcount(m);
    lane = _mm512_add_epi32(lane, step);
  }
  return k;
}
#endif

// One SpikingJelly step of a row: H = charge(V, X), S = H >= threshold, V = reset(H, S); the
// dynamics and the reset fixed at compile time so that the loop vectorises.
template <int kDyn, bool kHard, class Param, typename scalar_t, typename acc_t>
inline void sj_step_row(int64_t n, const scalar_t* __restrict__ cur, acc_t* __restrict__ v,
                        acc_t* __restrict__ h, acc_t* __restrict__ s, scalar_t* __restrict__ spk,
                        Param threshold, acc_t tau, acc_t v_reset) {
  for (int64_t j = 0; j < n; ++j) {
    const acc_t hj = math::sj_charge(v[j], static_cast<acc_t>(cur[j]), tau, v_reset, kDyn);
    const acc_t sj = math::sj_fire(hj, threshold[j]);
    h[j] = hj;
    s[j] = sj;
    spk[j] = static_cast<scalar_t>(sj);
    v[j] = math::sj_reset(hj, sj, threshold[j], v_reset, kHard);
  }
}

template <class Param, typename scalar_t, typename acc_t>
inline void sj_step_row(int dyn, bool hard, int64_t n, const scalar_t* cur, acc_t* v, acc_t* h,
                        acc_t* s, scalar_t* spk, Param threshold, acc_t tau, acc_t v_reset) {
  auto run = [&](auto d) {
    constexpr int kDyn = decltype(d)::value;
    if (hard) return sj_step_row<kDyn, true>(n, cur, v, h, s, spk, threshold, tau, v_reset);
    return sj_step_row<kDyn, false>(n, cur, v, h, s, spk, threshold, tau, v_reset);
  };
  switch (dyn) {
    case kChargeSJDecayInput: return run(std::integral_constant<int, kChargeSJDecayInput>{});
    case kChargeSJ: return run(std::integral_constant<int, kChargeSJ>{});
    default: return run(std::integral_constant<int, kChargeSJIF>{});
  }
}

// What the tensor-parameter op adds to the forward (all absent for the float op).
template <typename scalar_t>
struct ForwardExtras {
  bool syn = false;                   // synaptic current (alpha_syn given)
  const scalar_t* syn_init = nullptr;
  bool need_p = false, need_q = false, need_u = false;  // traces to keep
  bool dense_traces = false;          // keep them at every entry ([T, B, N]), not per active one
  bool track() const { return need_p || need_q || need_u; }
};

// Where the rows' current comes from: the neuron op's current [T, B, N], or (the fused
// tensor-parameter layer, lif_param_forward) x W^T + b summed from x's events into a padded row
// buffer by RowCurrent, as lif_forward does, so that no [T, B, N] current is ever stored.
template <typename scalar_t>
struct GivenCurrent {
  static constexpr bool kCountNonzeros = true;  // stats[2]: the current's nonzero entries
  const scalar_t* in;
  int64_t B, N;
  int64_t buffer_width() const { return 0; }
  const scalar_t* row(int64_t b, int64_t t, scalar_t* /*buffer*/) const { return in + (t * B + b) * N; }
};

template <typename scalar_t>
struct EventCurrent {
  static constexpr bool kCountNonzeros = false;  // stats[2]: x's nonzeros, known from its scan
  const RowCurrent<scalar_t>* rows;
  int64_t buffer_width() const { return rows->width; }
  const scalar_t* row(int64_t b, int64_t t, scalar_t* buffer) const {
    rows->fill(b, t, buffer);
    return buffer;
  }
};

// The active set's value columns besides the indices: the surrogate, the reset's own term
// (SpikingJelly, detach_reset=False) and the traces P, Q, U (compact traces).
enum ActiveColumn : int { kColSg = 0, kColRg, kColP, kColQ, kColU, kActiveColumns };

// The active entries one task of the forward appends for its batch elements, row by row (t
// ascending within an element, so that each element's entries are one run): the indices and the
// wanted columns, each in a thread-local scratch kept between calls, as the row kernels' event
// lists are (per-call vectors grown entry by entry spent ~7 % of the synaptic SHD forward in
// copies and page faults). Valid until the thread's next forward call.
template <typename scalar_t>
struct ActiveAppender {
  Scratch* scratch[1 + kActiveColumns];
  bool want[kActiveColumns];
  int64_t used = 0;
  int32_t* idx = nullptr;
  scalar_t* col[kActiveColumns] = {};

  explicit ActiveAppender(const bool (&wanted)[kActiveColumns]) {
    static thread_local Scratch slots[1 + kActiveColumns];
    for (int k = 0; k <= kActiveColumns; ++k) {
      scratch[k] = &slots[k];
      slots[k].shrink_if_large();
    }
    std::copy(wanted, wanted + kActiveColumns, want);
    reserve(0);
  }
  // Room for n more entries, plus the slack that active_row may write past its count.
  void reserve(int64_t n) {
    const int64_t need = n + kScratchSlack;
    const int64_t s = sizeof(scalar_t);
    idx = reinterpret_cast<int32_t*>(scratch[0]->reserve(used * 4, need * 4));
    for (int k = 0; k < kActiveColumns; ++k)
      if (want[k]) col[k] = reinterpret_cast<scalar_t*>(scratch[1 + k]->reserve(used * s, need * s));
  }
};

struct ForwardResult {
  at::Tensor spikes, v_final, syn_final, act_cnt, act_idx, act_sg, act_rg, act_p, act_q, act_u,
      tan_last, rst_bits, mem, stats;
};

template <typename scalar_t, class Param, class Source>
ForwardResult forward_impl(const Source& source, int64_t T, int64_t B, int64_t N,
                           const at::TensorOptions& opts, const c10::optional<at::Tensor>& v_init,
                           const c10::optional<at::Tensor>& s_init,
                           const NeuronParams<Param>& prm, const ForwardExtras<scalar_t>& ex,
                           double b_th_d, double slope_d, bool sparse, int surrogate, int reset,
                           bool return_mem, const SJParams& sj) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t W = bit_words(N);
  const acc_t b_th = b_th_d, slope = slope_d;
  const Param& threshold = prm.threshold;
  const bool keep_bits = reset == kResetZero;
  const bool leaky = sj.dynamics == kChargeLeaky;
  const bool keep_rg = !leaky && !sj.detach_reset;
  const bool track = ex.track(), dense_tr = ex.dense_traces;
  const acc_t tau = sj.tau, v_reset = sj.v_reset;

  auto spikes = at::empty({T, B, N}, opts);
  auto v_final = at::empty({B, N}, opts);
  auto syn_final = ex.syn ? at::empty({B, N}, opts) : at::empty({0}, opts);
  auto sg_dense = at::empty({sparse ? 0 : T * B * N}, opts);
  auto mem = at::empty({return_mem ? T : 0, B, N}, opts);
  auto rst_bits = at::empty({keep_bits ? T : 0, B, W}, opts.dtype(at::kInt));
  if (!keep_bits) rst_bits = rst_bits.reshape({0});
  if (!return_mem) mem = mem.reshape({0});
  auto act_cnt = at::empty({sparse ? B * T : 0}, opts.dtype(at::kInt));
  auto rg_dense = at::empty({keep_rg && !sparse ? T * B * N : 0}, opts);
  auto dense_trace = [&](bool need) { return at::empty({need && dense_tr ? T * B * N : 0}, opts); };
  at::Tensor tp_dense = dense_trace(ex.need_p), tq_dense = dense_trace(ex.need_q),
             tu_dense = dense_trace(ex.need_u);
  auto tan_last = track ? at::empty({4, B, N}, opts) : at::empty({0}, opts);

  scalar_t* spk = spikes.data_ptr<scalar_t>();
  scalar_t* vfin = v_final.data_ptr<scalar_t>();
  scalar_t* synfin = syn_final.numel() ? syn_final.template data_ptr<scalar_t>() : nullptr;
  scalar_t* sgd = sparse ? nullptr : sg_dense.data_ptr<scalar_t>();
  scalar_t* rgd = keep_rg && !sparse ? rg_dense.data_ptr<scalar_t>() : nullptr;
  scalar_t* memp = return_mem ? mem.data_ptr<scalar_t>() : nullptr;
  int32_t* bits = keep_bits ? rst_bits.data_ptr<int32_t>() : nullptr;
  int32_t* cnt = sparse ? act_cnt.data_ptr<int32_t>() : nullptr;
  const scalar_t* v0 = v_init.has_value() ? v_init->data_ptr<scalar_t>() : nullptr;
  const scalar_t* s0 = s_init.has_value() ? s_init->data_ptr<scalar_t>() : nullptr;
  scalar_t* dtr[3] = {tp_dense.numel() ? tp_dense.data_ptr<scalar_t>() : nullptr,
                      tq_dense.numel() ? tq_dense.data_ptr<scalar_t>() : nullptr,
                      tu_dense.numel() ? tu_dense.data_ptr<scalar_t>() : nullptr};
  const bool need_tr[3] = {ex.need_p, ex.need_q, ex.need_u};
  scalar_t* tlast = track ? tan_last.data_ptr<scalar_t>() : nullptr;

  // sparse: each element's run of active entries in its task's ActiveAppender
  const bool want_col[kActiveColumns] = {true, keep_rg, !dense_tr && need_tr[0],
                                         !dense_tr && need_tr[1], !dense_tr && need_tr[2]};
  std::vector<int64_t> run_first(sparse ? B : 0), run_len(sparse ? B : 0);
  std::vector<const int32_t*> run_idx(sparse ? B : 0);
  std::vector<const scalar_t*> run_col[kActiveColumns];
  for (auto& c : run_col) c.resize(sparse ? B : 0);
  // The reset's own gradient term at an entry (detach_reset=False): dV_post/dH beyond (1 - S).
  auto reset_term = [&](acc_t h, acc_t sg, int64_t j) -> acc_t {
    return reset == kResetZero ? (v_reset - h) * sg : -threshold[j] * sg;
  };
  std::vector<int64_t> spike_count(B, 0), nonzero_count(B, 0);

  at::parallel_for(0, B, grain_for(T * N), [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> v(N), s(N), h_buf(leaky ? 0 : N), syn(ex.syn ? N : 0);
    std::vector<scalar_t> cur_buf(source.buffer_width()), spk_stage(N);
    // forward-mode traces P, Q, R, U (track only)
    std::vector<acc_t> tg(track ? 4 * N : 0);
    acc_t* tgp[4] = {nullptr, nullptr, nullptr, nullptr};
    if (track)
      for (int k = 0; k < 4; ++k) tgp[k] = tg.data() + k * N;
    acc_t* tr_of[3] = {tgp[0], tgp[1], tgp[3]};  // P, Q, U: what the backward reads
    c10::optional<ActiveAppender<scalar_t>> app;
    if (sparse) app.emplace(want_col);
    // The membrane the spike is read from: V itself (leaky), or the charge H (SpikingJelly).
    acc_t* h = leaky ? v.data() : h_buf.data();
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t j = 0; j < N; ++j) {
        v[j] = v0 ? static_cast<acc_t>(v0[b * N + j]) : acc_t(0);
        s[j] = s0 ? static_cast<acc_t>(s0[b * N + j]) : acc_t(0);
      }
      if (ex.syn)
        for (int64_t j = 0; j < N; ++j)
          syn[j] = ex.syn_init ? static_cast<acc_t>(ex.syn_init[b * N + j]) : acc_t(0);
      std::fill(tg.begin(), tg.end(), acc_t(0));
      int64_t fired = 0, nonzero = 0;
      if (sparse) run_first[b] = app->used;
      for (int64_t t = 0; t < T; ++t) {
        const int64_t row = (t * B + b) * N;
        const scalar_t* cur = source.row(b, t, cur_buf.data());
        // The spikes go out with streaming stores (stream_copy): rows of one element lie
        // B*N apart, and a plain store would read each line in before writing it.
        scalar_t* spk_row = leaky ? spk_stage.data() : spk + row;
        // Separate simple loops so that each one vectorises.
        if (leaky) {
          if (bits) pack_bits(s.data(), N, bits + (t * B + b) * W);  // R[t] = S[t-1]
          with_reset(reset, [&](auto kind) {
            constexpr int kReset = decltype(kind)::value;
            if (ex.syn) {
              if (track)
                tangent_row<kReset, true>(N, v.data(), s.data(), syn.data(), tgp[0], tgp[1],
                                            tgp[2], tgp[3], prm);
              leaky_step_row<kReset, true>(N, cur, v.data(), s.data(), syn.data(), spk_row, prm);
            } else {
              if (track)
                tangent_row<kReset, false>(N, v.data(), s.data(), syn.data(), tgp[0], tgp[1],
                                             tgp[2], tgp[3], prm);
              leaky_step_row<kReset, false>(N, cur, v.data(), s.data(), syn.data(), spk_row, prm);
            }
          });
          stream_copy(spk + row, spk_row, N);
        } else {
          sj_step_row(sj.dynamics, reset == kResetZero, N, cur, v.data(), h, s.data(), spk + row,
                      threshold, tau, v_reset);
          if (bits) pack_bits(s.data(), N, bits + (t * B + b) * W);  // S[t], resets after step t
        }
        for (int64_t j = 0; j < N; ++j) fired += s[j] > acc_t(0);
        if constexpr (Source::kCountNonzeros)
          for (int64_t j = 0; j < N; ++j) nonzero += cur[j] != scalar_t(0);
        if (memp)
          for (int64_t j = 0; j < N; ++j) memp[row + j] = static_cast<scalar_t>(h[j]);
        if (dense_tr)
          for (int k = 0; k < 3; ++k)
            if (dtr[k])
              for (int64_t j = 0; j < N; ++j) dtr[k][row + j] = static_cast<scalar_t>(tr_of[k][j]);
        if (sparse) {
          app->reserve(N);
          const int64_t at = app->used;
          int32_t* row_idx = app->idx + at;
          const int64_t active = active_row(N, h, row_idx, threshold, b_th);
          cnt[b * T + t] = static_cast<int32_t>(active);
          scalar_t* sg_b = app->col[kColSg] + at;
          for (int64_t e = 0; e < active; ++e) {
            const int32_t j = row_idx[e];
            const acc_t g = math::surrogate(h[j], threshold[j], slope, surrogate);
            sg_b[e] = static_cast<scalar_t>(g);
            if (keep_rg) app->col[kColRg][at + e] = static_cast<scalar_t>(reset_term(h[j], g, j));
          }
          for (int k = 0; k < 3; ++k) {
            if (!want_col[kColP + k]) continue;
            scalar_t* tr_b = app->col[kColP + k] + at;
            for (int64_t e = 0; e < active; ++e) tr_b[e] = static_cast<scalar_t>(tr_of[k][row_idx[e]]);
          }
          app->used += active;
        } else {
          surrogate_row(surrogate, N, h, sgd + row, threshold, slope);
          if (rgd)
            for (int64_t j = 0; j < N; ++j)
              rgd[row + j] = static_cast<scalar_t>(reset_term(h[j], static_cast<acc_t>(sgd[row + j]), j));
        }
      }
      for (int64_t j = 0; j < N; ++j) vfin[b * N + j] = static_cast<scalar_t>(v[j]);
      if (synfin)
        for (int64_t j = 0; j < N; ++j) synfin[b * N + j] = static_cast<scalar_t>(syn[j]);
      if (tlast)
        for (int k = 0; k < 4; ++k)
          for (int64_t j = 0; j < N; ++j)
            tlast[(k * B + b) * N + j] = static_cast<scalar_t>(tgp[k][j]);
      spike_count[b] = fired;
      nonzero_count[b] = nonzero;
      if (sparse) run_len[b] = app->used - run_first[b];
    }
    if (sparse)  // the scratch's final place, after the task's last reserve
      for (int64_t b = b0; b < b1; ++b) {
        run_idx[b] = app->idx;
        for (int k = 0; k < kActiveColumns; ++k) run_col[k][b] = app->col[k];
      }
    stream_fence();
  });

  auto stats = at::empty({3}, opts.dtype(at::kLong));
  int64_t* st = stats.data_ptr<int64_t>();
  st[0] = st[2] = 0;
  for (int64_t b = 0; b < B; ++b) {
    st[0] += spike_count[b];
    st[2] += nonzero_count[b];
  }
  ForwardResult r;
  r.spikes = spikes;
  r.v_final = v_final;
  r.syn_final = syn_final;
  r.rst_bits = rst_bits;
  r.mem = mem;
  r.stats = stats;
  r.tan_last = tan_last;
  r.act_cnt = act_cnt;
  if (!sparse) {
    st[1] = T * B * N;
    r.act_idx = at::empty({0}, opts.dtype(at::kInt));
    r.act_sg = sg_dense.view({T, B, N});
    r.act_rg = keep_rg ? rg_dense.view({T, B, N}) : rg_dense;
    r.act_p = tp_dense;
    r.act_q = tq_dense;
    r.act_u = tu_dense;
    return r;
  }
  std::vector<int64_t> base(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) base[b + 1] = base[b] + run_len[b];
  st[1] = base[B];
  auto idx_out = at::empty({base[B]}, opts.dtype(at::kInt));
  at::Tensor col_out[kActiveColumns];
  for (int k = 0; k < kActiveColumns; ++k) col_out[k] = at::empty({want_col[k] ? base[B] : 0}, opts);
  int32_t* ip = idx_out.data_ptr<int32_t>();
  at::parallel_for(0, B, grain_for(base[B] / std::max<int64_t>(B, 1) + 1), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      std::copy_n(run_idx[b] + run_first[b], run_len[b], ip + base[b]);
      for (int k = 0; k < kActiveColumns; ++k)
        if (want_col[k])
          std::copy_n(run_col[k][b] + run_first[b], run_len[b], col_out[k].data_ptr<scalar_t>() + base[b]);
    }
  });
  r.act_idx = idx_out;
  r.act_sg = col_out[kColSg];
  r.act_rg = col_out[kColRg];
  r.act_p = dense_tr ? tp_dense : col_out[kColP];
  r.act_q = dense_tr ? tq_dense : col_out[kColQ];
  r.act_u = dense_tr ? tu_dense : col_out[kColU];
  return r;
}

// g[j] = 0 where bit j0 + j of the row's words is set (the hard reset after the step), j < n.
template <typename acc_t>
inline void zero_where_set(acc_t* __restrict__ g, int64_t n, const int32_t* words, int64_t j0) {
  int64_t j = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<acc_t, float>) {
    if (j0 % 16 == 0)
      for (; j + 16 <= n; j += 16) {
        const int64_t q = j0 + j;
        const __mmask16 set = static_cast<__mmask16>(static_cast<uint32_t>(words[q >> 5]) >> (q & 31));
        _mm512_storeu_ps(g + j, _mm512_maskz_mov_ps(static_cast<__mmask16>(~set), _mm512_loadu_ps(g + j)));
      }
  }
#endif
  for (; j < n; ++j) g[j] = bit_set(words, j0 + j) ? acc_t(0) : g[j];
}

// Row loops of the backward walk, with restrict pointers so that they vectorise: the walk's
// state rows, its output row and the parameter rows never overlap (through plain pointers the
// compiler must assume they may, and the loops stay scalar).
template <class Param, typename acc_t>
inline void scale_row(int64_t n, acc_t* __restrict__ g, const Param& a, int64_t j0) {
  for (int64_t j = 0; j < n; ++j) g[j] *= a[j0 + j];
}

// out = g * scale (scale 1: a copy, with the bits of g)
template <typename acc_t, typename out_t>
inline void scaled_copy_row(int64_t n, const acc_t* __restrict__ g, out_t* __restrict__ out,
                            acc_t scale) {
  if (scale == acc_t(1))
    for (int64_t j = 0; j < n; ++j) out[j] = static_cast<out_t>(g[j]);
  else
    for (int64_t j = 0; j < n; ++j) out[j] = static_cast<out_t>(g[j] * scale);
}

// The synaptic current's gradient: G_I[t] = alpha_syn * G_I[t+1] + G_V[t] (decay: t < T-1; at
// t = T-1, G_I starts from dL/dsyn_final), and out = G_I.
template <class Param, typename acc_t, typename out_t>
inline void syn_grad_row(int64_t n, bool decay, const acc_t* __restrict__ g, acc_t* __restrict__ gi,
                         out_t* __restrict__ out, const Param& alpha_syn, int64_t j0) {
  if (decay)
    for (int64_t j = 0; j < n; ++j) {
      acc_t v = gi[j] * alpha_syn[j0 + j];
      v += g[j];
      gi[j] = v;
      out[j] = static_cast<out_t>(v);
    }
  else
    for (int64_t j = 0; j < n; ++j) {
      const acc_t v = gi[j] + g[j];
      gi[j] = v;
      out[j] = static_cast<out_t>(v);
    }
}

// Neurons per backward task: G for a block stays in L1.
constexpr int64_t kNeuronBlock = 512;

// What the tensor-parameter op adds to the backward (all absent for the float op).
template <typename scalar_t>
struct BackwardExtras {
  bool syn = false;
  const scalar_t* grad_syn_final = nullptr;     // [B, N]
  scalar_t* dsyn = nullptr;                     // [B, N] out, or null
  // parameter gradients: the traces (compact or [T, B, N]) and the outputs [B, N]
  const scalar_t* tr[3] = {nullptr, nullptr, nullptr};  // P, Q, U
  const scalar_t* tan_last = nullptr;                   // [4, B, N]: P, Q, R, U
  bool dense_traces = false;
  scalar_t* dparam[3] = {nullptr, nullptr, nullptr};   // d_alpha, d_threshold, d_alpha_syn
  bool track() const { return dparam[0] || dparam[1] || dparam[2]; }
};

// The reverse-time walk of the neuron ops' backward over a block of neurons j0 .. j0+n of one
// batch element: begin() at t = T-1, step() for t = T-1 .. 0 (each gives the row's dL/dcurrent),
// finish() after t = 0. Shared by the neuron ops (dL/dcurrent written as a tensor) and the fused
// tensor-parameter layer (lif_param_backward: fed straight to the tiled walk), so both do the
// same arithmetic in the same order.
template <typename scalar_t, class Param>
struct NeuronBackwardWalk {
  using acc_t = at::opmath_type<scalar_t>;
  // Per-neuron state of a block, indexed 0 .. n-1. g: G[t] = dL/dV[t] (leaky) or dL/dH[t]
  // (SpikingJelly); carry: dL/dV_post[t] (SpikingJelly); gi: G_I (synaptic current);
  // da, dth, das: the parameter gradients (track only).
  struct State {
    acc_t *g, *carry, *gi, *da, *dth, *das;
  };
  int64_t T = 0, B = 0, N = 0, W = 0;
  const scalar_t *gs = nullptr, *gvf = nullptr, *gm = nullptr, *sg = nullptr, *rg = nullptr;
  const int32_t* bits = nullptr;
  const int64_t* offs = nullptr;  // sparse: the active set's row offsets (rows b*T + t)
  const int32_t* idx = nullptr;
  // sparse: delta = dL/dS * surrogate at the active entries (active_deltas), owned by the walk
  std::shared_ptr<const acc_t[]> delta;
  bool sparse = false, leaky = true, track = false;
  int reset = kResetSubtract;
  acc_t input_scale = 1;
  NeuronParams<Param> prm;
  const BackwardExtras<scalar_t>* ex = nullptr;
  scalar_t* dvp = nullptr;

  // the trace k of an entry (global index e of the active set, or position at in [T, B, N])
  acc_t trace(int k, int64_t e, int64_t at) const {
    const scalar_t* p = ex->tr[k];
    return p == nullptr ? acc_t(0) : static_cast<acc_t>(p[ex->dense_traces ? at : e]);
  }

  void begin(int64_t b, int64_t j0, int64_t n, const State& s) const {
    for (int64_t j = 0; j < n; ++j) s.g[j] = gvf ? static_cast<acc_t>(gvf[b * N + j0 + j]) : acc_t(0);
    if (ex->syn)
      for (int64_t j = 0; j < n; ++j)
        s.gi[j] = ex->grad_syn_final ? static_cast<acc_t>(ex->grad_syn_final[b * N + j0 + j]) : acc_t(0);
    if (track) {
      std::fill(s.da, s.da + n, acc_t(0));
      std::fill(s.dth, s.dth + n, acc_t(0));
      std::fill(s.das, s.das + n, acc_t(0));
      const scalar_t* tl = ex->tan_last;
      auto last = [&](int q, int64_t j) { return static_cast<acc_t>(tl[(q * B + b) * N + j0 + j]); };
      if (gvf)
        for (int64_t j = 0; j < n; ++j)
          math::param_grads(s.da[j], s.dth[j], s.das[j], s.g[j], last(0, j), last(1, j), last(3, j), false);
      if (ex->grad_syn_final)
        for (int64_t j = 0; j < n; ++j) s.das[j] += s.gi[j] * last(2, j);
    }
  }

  // Step t of the walk; out[0 .. n) = dL/dcurrent of the row (t, b).
  template <typename out_t>
  void step(int64_t b, int64_t t, int64_t j0, int64_t n, const State& s, out_t* out) const {
    acc_t* g = s.g;
    acc_t *da = s.da, *dth = s.dth, *das = s.das;
    const Param& alpha = prm.alpha;
    const int64_t row = (t * B + b) * N + j0;
    if (leaky) {
      if (t < T - 1) {  // G[t] = trace_decay(alpha, R[t+1]) * G[t+1] + ...
        if (bits) {
          const int32_t* r = bits + ((t + 1) * B + b) * W;
          for (int64_t j = 0; j < n; ++j)
            g[j] *= math::trace_decay(alpha[j0 + j], bit_set(r, j0 + j), reset);
        } else {
          scale_row(n, g, alpha, j0);
        }
      }
    } else {
      // carry = dL/dV_post[t]: grad_v_final at the last step, else alpha * G[t+1]; the reset
      // after step t passes it on times (1 - S[t]) (hard) or 1 (soft).
      if (t < T - 1) scale_row(n, g, alpha, j0);
      for (int64_t j = 0; j < n; ++j) s.carry[j] = g[j];
      if (bits) zero_where_set(g, n, bits + (t * B + b) * W, j0);
    }
    if (gm) {
      for (int64_t j = 0; j < n; ++j) g[j] += static_cast<acc_t>(gm[row + j]);
      if (track)
        for (int64_t j = 0; j < n; ++j)
          math::param_grads(da[j], dth[j], das[j], static_cast<acc_t>(gm[row + j]),
                            trace(0, 0, row + j), trace(1, 0, row + j), trace(2, 0, row + j), false);
    }
    if (sparse) {
      const int64_t r = b * T + t;
      const int32_t* lo = std::lower_bound(idx + offs[r], idx + offs[r + 1], static_cast<int32_t>(j0));
      for (int64_t e = lo - idx; e < offs[r + 1] && idx[e] < j0 + n; ++e) {
        const int64_t j = idx[e] - j0;
        if (rg) g[j] += s.carry[j] * static_cast<acc_t>(rg[e]);
        const acc_t d = delta[e];
        g[j] += d;
        if (track && d != acc_t(0))
          math::param_grads(da[j], dth[j], das[j], d, trace(0, e, row + j), trace(1, e, row + j),
                            trace(2, e, row + j), true);
      }
    } else {
      if (rg)
        for (int64_t j = 0; j < n; ++j) g[j] += s.carry[j] * static_cast<acc_t>(rg[row + j]);
      if (track) {
        for (int64_t j = 0; j < n; ++j) {
          const acc_t delta = static_cast<acc_t>(gs[row + j]) * static_cast<acc_t>(sg[row + j]);
          g[j] += delta;
          if (delta != acc_t(0))
            math::param_grads(da[j], dth[j], das[j], delta, trace(0, 0, row + j),
                              trace(1, 0, row + j), trace(2, 0, row + j), true);
        }
      } else {
        for (int64_t j = 0; j < n; ++j)
          g[j] += static_cast<acc_t>(gs[row + j]) * static_cast<acc_t>(sg[row + j]);
      }
    }
    if (ex->syn)  // the current reaches V through syn
      syn_grad_row(n, t < T - 1, g, s.gi, out, prm.alpha_syn, j0);
    else
      scaled_copy_row(n, g, out, leaky ? acc_t(1) : input_scale);
  }

  // dv_init, dsyn_init and the parameter gradients of the block, after step 0 (or T = 0).
  void finish(int64_t b, int64_t j0, int64_t n, const State& s) const {
    const Param& alpha = prm.alpha;
    if (dvp) {
      const int32_t* r = bits && leaky ? bits + b * W : nullptr;
      for (int64_t j = 0; j < n; ++j)
        dvp[b * N + j0 + j] = static_cast<scalar_t>(  // T = 0: V_final is V_init, g = grad_v_final
            T > 0 ? math::trace_decay(alpha[j0 + j], r != nullptr && bit_set(r, j0 + j), reset) * s.g[j]
                  : s.g[j]);
    }
    if (ex->dsyn)  // syn[0] = alpha_syn * syn_init + I[0]; T = 0: syn_final is syn_init
      for (int64_t j = 0; j < n; ++j)
        ex->dsyn[b * N + j0 + j] = static_cast<scalar_t>(T > 0 ? prm.alpha_syn[j0 + j] * s.gi[j] : s.gi[j]);
    const acc_t* dpar[3] = {s.da, s.dth, s.das};
    for (int q = 0; q < 3; ++q)
      if (ex->dparam[q])
        for (int64_t j = 0; j < n; ++j) ex->dparam[q][b * N + j0 + j] = static_cast<scalar_t>(dpar[q][j]);
  }
};

// The walk over the given tensors (op names the op in errors on the active set).
template <typename scalar_t, class Param>
NeuronBackwardWalk<scalar_t, Param> make_backward_walk(
    const at::Tensor& grad_spikes, const c10::optional<at::Tensor>& grad_v_final,
    const c10::optional<at::Tensor>& grad_mem, const at::Tensor& act_sg,
    const c10::optional<at::Tensor>& act_rg, const c10::optional<at::Tensor>& rst_bits,
    const at::Tensor& offsets, const at::Tensor& act_idx, const NeuronParams<Param>& prm,
    bool sparse, bool leaky, double input_scale, const BackwardExtras<scalar_t>& ex,
    scalar_t* dvp) {
  NeuronBackwardWalk<scalar_t, Param> w;
  w.T = grad_spikes.size(0);
  w.B = grad_spikes.size(1);
  w.N = grad_spikes.size(2);
  w.W = bit_words(w.N);
  w.gs = grad_spikes.data_ptr<scalar_t>();
  w.gvf = grad_v_final.has_value() ? grad_v_final->data_ptr<scalar_t>() : nullptr;
  w.gm = grad_mem.has_value() ? grad_mem->data_ptr<scalar_t>() : nullptr;
  w.sg = act_sg.data_ptr<scalar_t>();
  w.rg = act_rg.has_value() ? act_rg->data_ptr<scalar_t>() : nullptr;
  w.bits = rst_bits.has_value() ? rst_bits->data_ptr<int32_t>() : nullptr;
  w.offs = sparse ? offsets.data_ptr<int64_t>() : nullptr;
  w.idx = sparse ? act_idx.data_ptr<int32_t>() : nullptr;
  if (sparse) w.delta = active_deltas<scalar_t>(w.gs, w.offs, w.idx, w.sg, w.T, w.B, w.N);
  w.sparse = sparse;
  w.leaky = leaky;
  w.track = ex.track();
  w.reset = rst_bits.has_value() ? kResetZero : kResetSubtract;
  w.input_scale = static_cast<at::opmath_type<scalar_t>>(input_scale);
  w.prm = prm;
  w.ex = &ex;
  w.dvp = dvp;
  return w;
}

// Row offsets of the active set (rows b*T + t), checked against the index length; empty when dense.
inline at::Tensor active_offsets(const at::Tensor& act_cnt, const at::Tensor& act_idx, int64_t N,
                                 bool sparse, const char* op) {
  if (!sparse) return at::empty({0}, act_cnt.options().dtype(at::kLong));
  at::Tensor offsets = row_offsets(act_cnt, act_idx.numel(), N, op, "act_cnt");
  check_columns(offsets, act_idx, N, op, "act_idx");
  return offsets;
}

template <typename scalar_t, class Param>
std::tuple<at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& grad_spikes, const c10::optional<at::Tensor>& grad_v_final,
    const c10::optional<at::Tensor>& grad_mem, const at::Tensor& act_cnt, const at::Tensor& act_idx,
    const at::Tensor& act_sg, const c10::optional<at::Tensor>& act_rg,
    const c10::optional<at::Tensor>& rst_bits, const NeuronParams<Param>& prm, bool sparse,
    bool need_dv, bool leaky, double input_scale, const BackwardExtras<scalar_t>& ex) {
  using acc_t = at::opmath_type<scalar_t>;
  using Walk = NeuronBackwardWalk<scalar_t, Param>;
  const int64_t T = grad_spikes.size(0), B = grad_spikes.size(1), N = grad_spikes.size(2);
  const bool track = ex.track();
  auto grad_current = at::empty({T, B, N}, grad_spikes.options());
  auto dv = at::empty({need_dv ? B : 0, N}, grad_spikes.options());
  if (!need_dv) dv = dv.reshape({0});
  scalar_t* gc = grad_current.data_ptr<scalar_t>();
  const at::Tensor offsets = active_offsets(act_cnt, act_idx, N, sparse, "lif_neuron_backward");
  const Walk walk = make_backward_walk<scalar_t>(grad_spikes, grad_v_final, grad_mem, act_sg, act_rg,
                                                 rst_bits, offsets, act_idx, prm, sparse, leaky,
                                                 input_scale, ex, need_dv ? dv.data_ptr<scalar_t>() : nullptr);

  const int64_t blocks = (N + kNeuronBlock - 1) / kNeuronBlock;
  at::parallel_for(0, B * blocks, grain_for(T * std::min(N, kNeuronBlock)), [&](int64_t k0, int64_t k1) {
    const int64_t nb = std::min(N, kNeuronBlock);
    std::vector<acc_t> g(nb), carry(leaky ? 0 : nb), gi(ex.syn ? nb : 0);
    std::vector<acc_t> dpar(track ? 3 * nb : 0);  // d_alpha, d_threshold, d_alpha_syn
    std::vector<scalar_t> gc_stage(nb);
    const typename Walk::State s{g.data(), carry.data(), gi.data(), dpar.data(),
                                 dpar.data() + (track ? nb : 0), dpar.data() + (track ? 2 * nb : 0)};
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t b = k / blocks, j0 = (k % blocks) * kNeuronBlock;
      const int64_t n = std::min(N - j0, kNeuronBlock);
      walk.begin(b, j0, n, s);
      for (int64_t t = T - 1; t >= 0; --t) {
        walk.step(b, t, j0, n, s, gc_stage.data());
        // dL/dcurrent of the row, staged and streamed out (stream_copy): the rows of one task lie
        // B*N apart, and a plain store would read each line in before writing it
        stream_copy(gc + (t * B + b) * N + j0, gc_stage.data(), n);
      }
      walk.finish(b, j0, n, s);
    }
    stream_fence();
  });
  return {grad_current, dv};
}

NeuronOutputs lif_neuron_forward_cpu(const at::Tensor& current_in,
                                     const c10::optional<at::Tensor>& v_init,
                                     const c10::optional<at::Tensor>& s_init, double alpha,
                                     double threshold, double b_th, double slope, bool sparse,
                                     c10::string_view surrogate, c10::string_view reset,
                                     bool return_mem, c10::string_view dynamics, double tau,
                                     double v_reset, bool detach_reset) {
  const NeuronOpKinds kinds = check_lif_neuron_forward_args(current_in, v_init, s_init, alpha,
                                                          threshold, b_th, slope, surrogate, reset,
                                                          return_mem, dynamics, tau);
  const SJParams sj{kinds.dynamics, tau, v_reset, detach_reset};
  const at::Tensor current = current_in.contiguous();
  NeuronOutputs out;
  AT_DISPATCH_FLOATING_TYPES(current.scalar_type(), "lif_neuron_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using P = ScalarParam<acc_t>;
    const NeuronParams<P> prm{P{static_cast<acc_t>(alpha)}, P{static_cast<acc_t>(threshold)},
                              P{acc_t(0)}};
    const GivenCurrent<scalar_t> given{current.data_ptr<scalar_t>(), current.size(1), current.size(2)};
    const ForwardResult r = forward_impl<scalar_t>(given, current.size(0), current.size(1),
                                                   current.size(2), current.options(),
                                                   contiguous(v_init), contiguous(s_init), prm, ForwardExtras<scalar_t>{}, b_th, slope,
                                                   sparse, kinds.surrogate, kinds.reset,
                                                   return_mem, sj);
    out = {r.spikes, r.v_final, r.act_cnt, r.act_idx, r.act_sg, r.act_rg, r.rst_bits, r.mem, r.stats};
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> lif_neuron_backward_cpu(
    const at::Tensor& grad_spikes_in, const c10::optional<at::Tensor>& grad_v_final,
    const c10::optional<at::Tensor>& grad_mem, const at::Tensor& act_cnt,
    const at::Tensor& act_idx, const at::Tensor& act_sg, const c10::optional<at::Tensor>& act_rg,
    const c10::optional<at::Tensor>& rst_bits, double alpha, bool sparse, bool need_dv,
    c10::string_view dynamics, double input_scale) {
  const bool has_rst = check_lif_neuron_backward_args(grad_spikes_in, grad_v_final, grad_mem,
                                                      act_cnt, act_idx, act_sg, act_rg, rst_bits,
                                                      alpha, sparse, dynamics);
  const bool leaky = parse_dynamics(dynamics, "lif_neuron_backward") == kChargeLeaky;
  const bool has_rg = act_rg.has_value() && act_rg->numel() > 0;
  const at::Tensor grad_spikes = grad_spikes_in.contiguous();
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(grad_spikes.scalar_type(), "lif_neuron_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using P = ScalarParam<acc_t>;
    const NeuronParams<P> prm{P{static_cast<acc_t>(alpha)}, P{acc_t(1)}, P{acc_t(0)}};
    out = backward_impl<scalar_t>(grad_spikes, contiguous(grad_v_final), contiguous(grad_mem),
                                  act_cnt.contiguous(), act_idx.contiguous(), act_sg.contiguous(),
                                  has_rg && !leaky ? contiguous(act_rg) : c10::nullopt,
                                  has_rst ? contiguous(rst_bits) : c10::nullopt, prm, sparse,
                                  need_dv, leaky, input_scale, BackwardExtras<scalar_t>{});
  });
  return out;
}

// The tensor-parameter op (per-neuron alpha / threshold / alpha_syn, learnable; leaky dynamics).
using ParamNeuronOutputs =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
               at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using ParamNeuronGrads =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;


// The tensor-parameter forward of rows [T, B, N] whose current comes from `source`; `opts` gives
// the outputs' dtype and device. Shared by the neuron op and the fused layer.
template <typename scalar_t, class Source>
ForwardResult param_forward(const Source& source, int64_t T, int64_t B, int64_t N,
                            const at::TensorOptions& opts, const c10::optional<at::Tensor>& v_init,
                            const c10::optional<at::Tensor>& s_init,
                            const c10::optional<at::Tensor>& syn_init, const at::Tensor& alpha,
                            const at::Tensor& threshold, const c10::optional<at::Tensor>& alpha_syn,
                            double b_th, double slope, bool sparse, NeuronKinds kinds,
                            bool return_mem, bool need_dalpha, bool need_dthreshold,
                            bool need_dalpha_syn) {
  using acc_t = at::opmath_type<scalar_t>;  // = scalar_t (half types run as float32)
  // alpha_syn is read only with a synaptic current (kSyn), where it is given
  const NeuronParams<RowParam<acc_t>> prm{
      {alpha.data_ptr<acc_t>()}, {threshold.data_ptr<acc_t>()},
      {alpha_syn.has_value() ? alpha_syn->data_ptr<acc_t>() : nullptr}};
  const TraceNeeds needs = trace_needs(need_dalpha, need_dthreshold, need_dalpha_syn,
                                       alpha_syn.has_value(), kinds.reset, sparse, return_mem);
  ForwardExtras<scalar_t> ex;
  ex.syn = alpha_syn.has_value();
  ex.syn_init = ptr_or_null<scalar_t>(syn_init);
  ex.need_p = needs.keep[0];
  ex.need_q = needs.keep[1];
  ex.need_u = needs.keep[2];
  ex.dense_traces = needs.dense_traces;
  ForwardResult r = forward_impl<scalar_t>(source, T, B, N, opts, v_init, s_init, prm, ex, b_th,
                                           slope, sparse, kinds.surrogate, kinds.reset,
                                           return_mem, SJParams{});
  if (needs.any && !r.tan_last.numel())  // threshold only, reset without Q: the last traces are zero
    r.tan_last = at::zeros({4, B, N}, opts);
  return r;
}

ParamNeuronOutputs param_outputs(const ForwardResult& r) {
  return {r.spikes, r.v_final, r.syn_final, r.act_cnt, r.act_idx, r.act_sg, r.act_p, r.act_q,
          r.act_u, r.tan_last, r.rst_bits, r.mem, r.stats};
}

ParamNeuronOutputs lif_neuron_param_forward_cpu(
    const at::Tensor& current_in, const c10::optional<at::Tensor>& v_init,
    const c10::optional<at::Tensor>& s_init, const c10::optional<at::Tensor>& syn_init,
    const at::Tensor& alpha_in, const at::Tensor& threshold_in,
    const c10::optional<at::Tensor>& alpha_syn_in, double b_th, double slope, bool sparse,
    c10::string_view surrogate, c10::string_view reset, bool return_mem, bool need_dalpha,
    bool need_dthreshold, bool need_dalpha_syn) {
  const NeuronKinds kinds = check_lif_neuron_param_forward_args(
      current_in, v_init, s_init, syn_init, alpha_in, threshold_in, alpha_syn_in, b_th, slope,
      surrogate, reset);
  const at::Tensor current = current_in.contiguous();
  const int64_t T = current.size(0), B = current.size(1), N = current.size(2);
  ParamNeuronOutputs out;
  AT_DISPATCH_FLOATING_TYPES(current.scalar_type(), "lif_neuron_param_forward_cpu", [&] {
    const GivenCurrent<scalar_t> given{current.data_ptr<scalar_t>(), B, N};
    out = param_outputs(param_forward<scalar_t>(
        given, T, B, N, current.options(), contiguous(v_init), contiguous(s_init),
        contiguous(syn_init), alpha_in.contiguous(), threshold_in.contiguous(),
        contiguous(alpha_syn_in), b_th, slope, sparse, kinds, return_mem, need_dalpha,
        need_dthreshold, need_dalpha_syn));
  });
  return out;
}

using ParamLayerOutputs = decltype(std::tuple_cat(ParamNeuronOutputs{},
                                                  std::tuple<at::Tensor, at::Tensor, at::Tensor>{}));

// The fused tensor-parameter layer (op_schemas.h, lif_param_forward): x scanned into its events
// once, each row's current summed from them in the walk (RowCurrent, lif_forward's), the neuron
// as the op above.
ParamLayerOutputs lif_param_forward_cpu(
    const at::Tensor& x_in, const at::Tensor& weight_in, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& v_init, const c10::optional<at::Tensor>& s_init,
    const c10::optional<at::Tensor>& syn_init, const at::Tensor& alpha_in,
    const at::Tensor& threshold_in, const c10::optional<at::Tensor>& alpha_syn_in, double b_th,
    double slope, bool sparse, c10::string_view surrogate, c10::string_view reset,
    bool return_mem, bool need_dalpha, bool need_dthreshold, bool need_dalpha_syn) {
  const NeuronKinds kinds = check_lif_param_forward_args(
      x_in, weight_in, bias, v_init, s_init, syn_init, alpha_in, threshold_in, alpha_syn_in, b_th,
      slope, surrogate, reset);
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const int64_t T = x.size(0), B = x.size(1), N = weight.size(0);
  ParamLayerOutputs out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lif_param_forward_cpu", [&] {
    const auto scan = scan_events<scalar_t>(x);
    const RowCurrent<scalar_t> rows(x, weight, contiguous(bias), *scan);
    ForwardResult r = param_forward<scalar_t>(
        EventCurrent<scalar_t>{&rows}, T, B, N, x.options(), contiguous(v_init),
        contiguous(s_init), contiguous(syn_init), alpha_in.contiguous(), threshold_in.contiguous(),
        contiguous(alpha_syn_in), b_th, slope, sparse, kinds, return_mem, need_dalpha,
        need_dthreshold, need_dalpha_syn);
    r.stats.data_ptr<int64_t>()[2] = scan->ev.nnz;
    const ScannedEvents& ev = scan->ev;
    out = std::tuple_cat(param_outputs(r), std::make_tuple(ev.cnt, ev.idx, ev.val));
  });
  return out;
}

// The tensor-parameter backward's parameters, traces and outputs dsyn_init, d_alpha,
// d_threshold, d_alpha_syn ([B, N] or empty), shared by the neuron op and the fused layer.
struct ParamBackwardTensors {
  at::Tensor alpha, tan_last, dsyn, tr[3], dparam[3];
  c10::optional<at::Tensor> alpha_syn, grad_syn_final;
  bool track = false;

  ParamBackwardTensors(const at::TensorOptions& opts, int64_t B, int64_t N, const at::Tensor& alpha_in,
                       const c10::optional<at::Tensor>& alpha_syn_in,
                       const c10::optional<at::Tensor>& grad_syn_final_in, const at::Tensor& act_p,
                       const at::Tensor& act_q, const at::Tensor& act_u, const at::Tensor& tan_last_in,
                       bool need_dsyn, bool need_dalpha, bool need_dthreshold, bool need_dalpha_syn)
      : alpha(alpha_in.contiguous()),
        tan_last(tan_last_in.contiguous()),
        alpha_syn(contiguous(alpha_syn_in)),
        grad_syn_final(contiguous(grad_syn_final_in)) {
    dsyn = need_dsyn ? at::empty({B, N}, opts) : at::empty({0}, opts);
    const bool need[3] = {need_dalpha, need_dthreshold, need_dalpha_syn};
    for (int q = 0; q < 3; ++q) dparam[q] = need[q] ? at::empty({B, N}, opts) : at::empty({0}, opts);
    tr[0] = act_p.contiguous();
    tr[1] = act_q.contiguous();
    tr[2] = act_u.contiguous();
    track = need_dalpha || need_dthreshold || need_dalpha_syn;
  }

  // the backward reads alpha, and alpha_syn with a synaptic current only (never threshold)
  template <typename acc_t>
  NeuronParams<RowParam<acc_t>> params() const {
    return {{alpha.data_ptr<acc_t>()}, {nullptr},
            {alpha_syn.has_value() ? alpha_syn->data_ptr<acc_t>() : nullptr}};
  }

  template <typename scalar_t>
  BackwardExtras<scalar_t> extras(bool dense_traces) const {
    BackwardExtras<scalar_t> ex;
    ex.syn = alpha_syn.has_value();
    ex.grad_syn_final = ptr_or_null<scalar_t>(grad_syn_final);
    ex.dsyn = dsyn.numel() ? dsyn.data_ptr<scalar_t>() : nullptr;
    for (int q = 0; q < 3; ++q) {
      ex.tr[q] = track && tr[q].numel() ? tr[q].data_ptr<scalar_t>() : nullptr;
      ex.dparam[q] = dparam[q].numel() ? dparam[q].data_ptr<scalar_t>() : nullptr;
    }
    ex.tan_last = track ? tan_last.data_ptr<scalar_t>() : nullptr;
    ex.dense_traces = dense_traces;
    return ex;
  }
};

ParamNeuronGrads lif_neuron_param_backward_cpu(
    const at::Tensor& grad_spikes_in, const c10::optional<at::Tensor>& grad_v_final,
    const c10::optional<at::Tensor>& grad_syn_final, const c10::optional<at::Tensor>& grad_mem,
    const at::Tensor& act_cnt, const at::Tensor& act_idx, const at::Tensor& act_sg,
    const at::Tensor& act_p, const at::Tensor& act_q, const at::Tensor& act_u,
    const at::Tensor& tan_last, const c10::optional<at::Tensor>& rst_bits,
    const at::Tensor& alpha_in, const c10::optional<at::Tensor>& alpha_syn_in, bool sparse,
    bool dense_traces, bool need_dv, bool need_dsyn, bool need_dalpha, bool need_dthreshold,
    bool need_dalpha_syn) {
  const bool has_rst = check_lif_neuron_param_backward_args(
      grad_spikes_in, grad_v_final, grad_syn_final, grad_mem, act_cnt, act_idx, act_sg, act_p,
      act_q, act_u, tan_last, rst_bits, alpha_in, alpha_syn_in, sparse, dense_traces, need_dsyn,
      need_dalpha, need_dthreshold, need_dalpha_syn);
  const at::Tensor grad_spikes = grad_spikes_in.contiguous();
  const ParamBackwardTensors pt(grad_spikes.options(), grad_spikes.size(1), grad_spikes.size(2),
                                alpha_in, alpha_syn_in, grad_syn_final, act_p, act_q, act_u,
                                tan_last, need_dsyn, need_dalpha, need_dthreshold, need_dalpha_syn);
  std::tuple<at::Tensor, at::Tensor> gd;
  AT_DISPATCH_FLOATING_TYPES(grad_spikes.scalar_type(), "lif_neuron_param_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gd = backward_impl<scalar_t>(grad_spikes, contiguous(grad_v_final), contiguous(grad_mem),
                                 act_cnt.contiguous(), act_idx.contiguous(), act_sg.contiguous(),
                                 c10::nullopt, has_rst ? contiguous(rst_bits) : c10::nullopt,
                                 pt.params<acc_t>(), sparse, need_dv, true, 1.0,
                                 pt.extras<scalar_t>(dense_traces));
  });
  return {std::get<0>(gd), std::get<1>(gd), pt.dsyn, pt.dparam[0], pt.dparam[1], pt.dparam[2]};
}

// The fused layer's injections for the tiled walk (tiled_backward.h): at each step a group's
// dL/dI rows come from the neuron's reverse walk of its neurons, so dL/dI [T, B, N] is never
// stored. The walk's state lies in [N] arrays, each group on its own lanes (the groups run in
// parallel); begin at t = T-1, finish after t = 0, as the tiled walk visits b, then t = T-1 .. 0.
template <typename scalar_t>
struct NeuronInject {
  using acc_t = at::opmath_type<scalar_t>;
  using Walk = NeuronBackwardWalk<scalar_t, RowParam<acc_t>>;
  static_assert(std::is_same<scalar_t, acc_t>::value, "dL/dI goes to the walk unrounded");
  const Walk* walk = nullptr;
  int64_t T = 0, n_out = 0;
  // [5][stride]: g, gi, d_alpha, d_threshold, d_alpha_syn; stride whole tiles and the base
  // aligned to them, so that no cache line holds two groups' lanes (written every step)
  acc_t* state = nullptr;
  int64_t stride = 0;

  typename Walk::State at(int64_t j0) const {
    acc_t* s = state + j0;
    return {s, nullptr, s + stride, s + 2 * stride, s + 3 * stride, s + 4 * stride};
  }
  // As ReadoutInject's reduce "none" read of dL/dI: every lane of the span, zeros past N.
  bool operator()(int64_t b, int64_t t, int64_t j_lo, int64_t span, acc_t* buf) const {
    const int64_t n = std::max<int64_t>(0, std::min(span, n_out - j_lo));
    const typename Walk::State s = at(j_lo);
    if (t == T - 1) walk->begin(b, j_lo, n, s);
    walk->step(b, t, j_lo, n, s, buf);
    std::fill(buf + n, buf + span, acc_t(0));
    if (t == 0) walk->finish(b, j_lo, n, s);
    return n > 0;
  }
};

using ParamLayerGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                   at::Tensor, at::Tensor, at::Tensor>;

// The fused tensor-parameter layer's backward (op_schemas.h, lif_param_backward): the neuron's
// reverse walk feeds dL/dI to the tiled events walk with trace decay 0 (what
// li_readout_backward at alpha = 0 does with a stored dL/dI), in the same order per element, so
// the gradients have the bits of lif_neuron_param_backward then li_readout_backward.
ParamLayerGrads lif_param_backward_cpu(
    const at::Tensor& grad_spikes_in, const c10::optional<at::Tensor>& grad_v_final,
    const c10::optional<at::Tensor>& grad_syn_final, const c10::optional<at::Tensor>& grad_mem,
    const at::Tensor& act_cnt, const at::Tensor& act_idx, const at::Tensor& act_sg,
    const at::Tensor& act_p, const at::Tensor& act_q, const at::Tensor& act_u,
    const at::Tensor& tan_last, const c10::optional<at::Tensor>& rst_bits,
    const at::Tensor& alpha_in, const c10::optional<at::Tensor>& alpha_syn_in,
    const at::Tensor& weight_in, const at::Tensor& ev_cnt, const at::Tensor& ev_idx_in,
    const at::Tensor& ev_val_in, const c10::optional<at::Tensor>& prev_cnt,
    const c10::optional<at::Tensor>& prev_idx_in, bool sparse, bool dense_traces, bool need_dx,
    bool need_dw, bool need_db, bool need_dv, bool need_dsyn, bool need_dalpha,
    bool need_dthreshold, bool need_dalpha_syn) {
  const char* op = "lif_param_backward";
  const bool has_rst = check_lif_param_backward_args(
      grad_spikes_in, grad_v_final, grad_syn_final, grad_mem, act_cnt, act_idx, act_sg, act_p,
      act_q, act_u, tan_last, rst_bits, alpha_in, alpha_syn_in, weight_in, ev_cnt, ev_idx_in,
      ev_val_in, prev_cnt, prev_idx_in, sparse, dense_traces, need_dx, need_dsyn, need_dalpha,
      need_dthreshold, need_dalpha_syn);
  const at::Tensor grad_spikes = grad_spikes_in.contiguous(), weight = weight_in.contiguous();
  const int64_t T = grad_spikes.size(0), B = grad_spikes.size(1), N = grad_spikes.size(2),
                n_in = weight.size(1);
  const at::Tensor ev_idx = ev_idx_in.contiguous(), ev_val = ev_val_in.contiguous();
  const at::Tensor ev_ptr = row_offsets(ev_cnt, ev_idx.numel(), n_in, op, "ev_cnt");
  check_index_range(ev_idx, n_in, op, "ev_idx");
  const auto prev_idx = contiguous(prev_idx_in);
  c10::optional<at::Tensor> prev_ptr;
  if (prev_cnt.has_value()) prev_ptr = row_offsets(*prev_cnt, prev_idx->numel(), n_in, op, "prev_cnt");
  if (prev_idx.has_value() && need_dx) check_index_range(*prev_idx, n_in, op, "prev_idx");
  const at::Tensor a_idx = act_idx.contiguous(), a_sg = act_sg.contiguous();
  const at::Tensor offsets = active_offsets(act_cnt.contiguous(), a_idx, N, sparse, op);
  const auto gvf = contiguous(grad_v_final), gm = contiguous(grad_mem);
  const auto bits = has_rst ? contiguous(rst_bits) : c10::nullopt;
  const auto opts = grad_spikes.options();
  const ParamBackwardTensors pt(opts, B, N, alpha_in, alpha_syn_in, grad_syn_final, act_p, act_q,
                                act_u, tan_last, need_dsyn, need_dalpha, need_dthreshold,
                                need_dalpha_syn);
  // T = 0: no step, so nothing reaches W, b or x
  auto layer_grad = [&](bool need, at::IntArrayRef shape) {
    return !need ? at::empty({0}, opts) : T > 0 ? at::empty(shape, opts) : at::zeros(shape, opts);
  };
  const at::Tensor dw = layer_grad(need_dw, {N, n_in}), db = layer_grad(need_db, {N}),
                   dx = layer_grad(need_dx, {T, B, n_in}), dv = layer_grad(need_dv, {B, N});
  AT_DISPATCH_FLOATING_TYPES(grad_spikes.scalar_type(), "lif_param_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BackwardExtras<scalar_t> ex = pt.extras<scalar_t>(dense_traces);
    const NeuronBackwardWalk<scalar_t, RowParam<acc_t>> walk = make_backward_walk<scalar_t>(
        grad_spikes, gvf, gm, a_sg, c10::nullopt, bits, offsets, a_idx, pt.params<acc_t>(),
        sparse, true, 1.0, ex, need_dv ? dv.data_ptr<scalar_t>() : nullptr);
    const int64_t tiles = std::max<int64_t>(1, Padded<acc_t>::tiles(N));
    std::unique_ptr<typename TileVec<acc_t>::type[]> state(new typename TileVec<acc_t>::type[5 * tiles]);
    NeuronInject<scalar_t> inject;
    inject.walk = &walk;
    inject.T = T;
    inject.n_out = N;
    inject.state = reinterpret_cast<acc_t*>(state.get());
    inject.stride = tiles * tile_lanes<acc_t>();
    if (T == 0) {  // the tiled walk takes no step: the neuron's start and end only
      for (int64_t b = 0; b < B; ++b) {
        walk.begin(b, 0, N, inject.at(0));
        walk.finish(b, 0, N, inject.at(0));
      }
      return;
    }
    at::Tensor weight_t;
    const TiledProblem<scalar_t> p = events_problem<scalar_t>(
        T, B, weight, ev_ptr, ev_idx, ev_val, prev_ptr, prev_idx, 0.0, weight_t,
        need_dx ? dx : at::Tensor(), need_dw ? dw : at::Tensor(), need_db ? db : at::Tensor());
    tiled_backward<scalar_t>(p, inject);
  });
  return {dx, dw, db, dv, pt.dsyn, pt.dparam[0], pt.dparam[1], pt.dparam[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsegrad, CPU, m) {
  m.impl("lif_neuron_forward", SG_FLOAT32_MATH(lif_neuron_forward_cpu));
  m.impl("lif_neuron_backward", SG_FLOAT32_MATH(lif_neuron_backward_cpu));
  m.impl("lif_neuron_param_forward", SG_FLOAT32_MATH(lif_neuron_param_forward_cpu));
  m.impl("lif_neuron_param_backward", SG_FLOAT32_MATH(lif_neuron_param_backward_cpu));
  m.impl("lif_param_forward", SG_FLOAT32_MATH(lif_param_forward_cpu));
  m.impl("lif_param_backward", SG_FLOAT32_MATH(lif_param_backward_cpu));
}

}  // namespace cpu
}  // namespace sparsegrad
