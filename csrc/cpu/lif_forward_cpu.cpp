// Fused LIF forward on the CPU, in two passes:
//   1. scan x once into its input events (per-row counts, indices, values), the layout the
//      backward reads as it is;
//   2. per batch element (threads over the batch), walk t: the row's current summed in SIMD
//      registers from the events (or read from one GEMM when x is dense), the membrane
//      recurrence, the spikes and, in sparse mode, the row's active entries with their surrogate
//      (compared 16 lanes at a time), appended to per-thread scratch and copied once into the
//      output tensors at the end.
#include <torch/library.h>

#include "low_precision.h"

#include "cpu/row_kernels.h"

namespace sparsegrad {
namespace cpu {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                           at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// words[w] bit l = (s[32w + l] > 0) for the n neurons of a row (rst_bits, op_schemas.h).
template <typename acc_t>
inline void pack_spikes(const acc_t* s, int64_t n, int32_t* words) {
  for (int64_t w = 0; w * 32 < n; ++w) {
    const int64_t m = std::min<int64_t>(32, n - w * 32);
    uint32_t bits = 0;
    for (int64_t l = 0; l < m; ++l) bits |= static_cast<uint32_t>(s[w * 32 + l] > acc_t(0)) << l;
    words[w] = static_cast<int32_t>(bits);
  }
}

// Appends the active entries of one padded row v[0 .. tiles*L) (|V - threshold| < b_th, j <
// n_out) with their surrogate sg_row[j] to idx/sg, in ascending j; returns how many. May write up
// to L entries past the count.
template <typename acc_t, typename scalar_t>
inline int64_t emit_active(const acc_t* v, const acc_t* sg_row, int64_t tiles, int64_t n_out, acc_t threshold,
                           acc_t b_th, int32_t* idx, scalar_t* sg) {
  constexpr int64_t L = tile_lanes<acc_t>();
  int64_t k = 0;
  for (int64_t g = 0; g < tiles; ++g) {
    const int64_t valid = std::min<int64_t>(L, n_out - g * L);
    for (int64_t l = 0; l < valid; ++l) {
      const int64_t j = g * L + l;
      if (math::is_active(v[j], threshold, b_th)) {
        idx[k] = static_cast<int32_t>(j);
        sg[k] = static_cast<scalar_t>(sg_row[j]);
        ++k;
      }
    }
  }
  return k;
}

#if defined(__AVX512F__)
// 16 lanes at a time: the active test as a mask, then the indices and surrogates of the tile
// compressed in registers and stored whole. No branch on the data.
template <>
inline int64_t emit_active<float, float>(const float* v, const float* sg_row, int64_t tiles, int64_t n_out,
                                         float threshold, float b_th, int32_t* idx, float* sg) {
  const __m512 thr = _mm512_set1_ps(threshold), bth = _mm512_set1_ps(b_th);
  __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i step = _mm512_set1_epi32(16);
  int64_t k = 0;
  for (int64_t g = 0; g < tiles; ++g) {
    const __m512 u = _mm512_abs_ps(_mm512_sub_ps(_mm512_loadu_ps(v + g * 16), thr));
    __mmask16 m = _mm512_cmp_ps_mask(u, bth, _CMP_LT_OQ);
    const int64_t valid = n_out - g * 16;
    if (valid < 16) m &= static_cast<__mmask16>((1u << valid) - 1u);
    _mm512_storeu_si512(idx + k, _mm512_maskz_compress_epi32(m, lane));
    _mm512_storeu_ps(sg + k, _mm512_maskz_compress_ps(m, _mm512_loadu_ps(sg_row + g * 16)));
    k += __builtin_popcount(m);
    lane = _mm512_add_epi32(lane, step);
  }
  return k;
}
#endif

template <typename scalar_t>
struct LifForwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const RowCurrent<scalar_t>* current = nullptr;
  int64_t T = 0, B = 0, n_out = 0;
  acc_t alpha = 0, threshold = 1, b_th = 0, slope = 1;
  const scalar_t* v_init = nullptr;
  const scalar_t* s_init = nullptr;
  scalar_t* spikes = nullptr;
  scalar_t* v_final = nullptr;
  scalar_t* sg_dense = nullptr;  // dense mode
  int32_t* act_cnt = nullptr;    // sparse mode: [B*T]
  int32_t* rst_bits = nullptr;   // reset to zero: [T, B, words], R[t] = S[t-1]
};

// Batch elements b0..b1-1, in blocks (t outer, b inner). Sparse mode appends each row's active
// entries to `act`. Returns the number of spikes.
template <typename scalar_t, int kReset, int kSurrogate>
int64_t lif_rows(const LifForwardArgs<scalar_t>& a, int64_t b0, int64_t b1,
                 CompactAppender<scalar_t>* act, RowLists<scalar_t>* act_rows) {
  using acc_t = at::opmath_type<scalar_t>;
  const RowCurrent<scalar_t>& current = *a.current;
  const int64_t T = a.T, B = a.B, n_out = a.n_out, width = current.width, tiles = current.tiles;
  const acc_t alpha = a.alpha, threshold = a.threshold, b_th = a.b_th, slope = a.slope;
  const int64_t block = batch_block(b1 - b0, 2 * width * int64_t(sizeof(acc_t)));
  // v and s of a block's elements, and one current row, padded to whole tiles; the padding stays
  // exactly 0 (zero current, no spike).
  std::unique_ptr<acc_t[]> buf(new acc_t[(2 * block + 2) * width + 1]);
  acc_t* cur = buf.get() + 2 * block * width;
  acc_t* sg_row = cur + width;
  // A step's output rows of the block ([t, c0 .. c1, :] is contiguous), streamed out at once.
  std::unique_ptr<scalar_t[]> stage(new scalar_t[(a.sg_dense ? 2 : 1) * block * n_out + 1]);
  scalar_t* spike_stage = stage.get();
  scalar_t* sg_stage = spike_stage + block * n_out;
  int64_t fired = 0;
  for (int64_t c0 = b0; c0 < b1; c0 += block) {
    const int64_t c1 = std::min(b1, c0 + block);
    for (int64_t b = c0; b < c1; ++b) {
      acc_t *v = buf.get() + 2 * (b - c0) * width, *s = v + width;
      for (int64_t j = 0; j < width; ++j) {
        const bool real = j < n_out;
        v[j] = real && a.v_init ? static_cast<acc_t>(a.v_init[b * n_out + j]) : acc_t(0);
        s[j] = real && a.s_init ? static_cast<acc_t>(a.s_init[b * n_out + j]) : acc_t(0);
      }
    }
    for (int64_t t = 0; t < T; ++t) {
      if (act) act->reserve((c1 - c0) * n_out);
      for (int64_t b = c0; b < c1; ++b) {
        acc_t *v = buf.get() + 2 * (b - c0) * width, *s = v + width;
        if (kReset == kResetZero) pack_spikes(s, n_out, a.rst_bits + (t * B + b) * bit_words(n_out));
        current.fill(b, t, cur);
        for (int64_t j = 0; j < width; ++j) {
          v[j] = math::integrate(v[j], cur[j], s[j], alpha, threshold, kReset);
          s[j] = math::fire(v[j], threshold);
        }
        scalar_t* spk = spike_stage + (b - c0) * n_out;
        int32_t f = 0;
        for (int64_t j = 0; j < n_out; ++j) {
          spk[j] = static_cast<scalar_t>(s[j]);
          f += s[j] > acc_t(0);
        }
        fired += f;
        // The surrogate of the whole row in one simple loop (it vectorises); the sparse mode keeps
        // it at the active entries only.
        for (int64_t j = 0; j < width; ++j) sg_row[j] = math::surrogate(v[j], threshold, slope, kSurrogate);
        if (act) {
          const int64_t k = emit_active<acc_t, scalar_t>(v, sg_row, tiles, n_out, threshold, b_th,
                                                         act->idx + act->used, act->val + act->used);
          act_rows->set(*act, b, t, k);
          act->used += k;
        } else {
          scalar_t* sg = sg_stage + (b - c0) * n_out;
          for (int64_t j = 0; j < n_out; ++j) sg[j] = static_cast<scalar_t>(sg_row[j]);
        }
      }
      const int64_t first = (t * B + c0) * n_out, n = (c1 - c0) * n_out;
      stream_copy(a.spikes + first, spike_stage, n);
      if (a.sg_dense) stream_copy(a.sg_dense + first, sg_stage, n);
    }
    for (int64_t b = c0; b < c1; ++b) {
      const acc_t* v = buf.get() + 2 * (b - c0) * width;
      for (int64_t j = 0; j < n_out; ++j) a.v_final[b * n_out + j] = static_cast<scalar_t>(v[j]);
    }
  }
  stream_fence();
  return fired;
}

template <typename scalar_t, int kReset>
int64_t dispatch_surrogate(int surrogate, const LifForwardArgs<scalar_t>& a, int64_t b0, int64_t b1,
                           CompactAppender<scalar_t>* act, RowLists<scalar_t>* rows) {
  switch (surrogate) {
    case kAtan: return lif_rows<scalar_t, kReset, kAtan>(a, b0, b1, act, rows);
    case kSigmoid: return lif_rows<scalar_t, kReset, kSigmoid>(a, b0, b1, act, rows);
    case kTriangle: return lif_rows<scalar_t, kReset, kTriangle>(a, b0, b1, act, rows);
    default: return lif_rows<scalar_t, kReset, kFastSigmoid>(a, b0, b1, act, rows);
  }
}

template <typename scalar_t>
int64_t dispatch_lif_rows(int reset, int surrogate, const LifForwardArgs<scalar_t>& a, int64_t b0, int64_t b1,
                          CompactAppender<scalar_t>* act, RowLists<scalar_t>* rows) {
  switch (reset) {
    case kResetZero: return dispatch_surrogate<scalar_t, kResetZero>(surrogate, a, b0, b1, act, rows);
    case kResetNone: return dispatch_surrogate<scalar_t, kResetNone>(surrogate, a, b0, b1, act, rows);
    default: return dispatch_surrogate<scalar_t, kResetSubtract>(surrogate, a, b0, b1, act, rows);
  }
}

template <typename scalar_t>
Outputs lif_forward_impl(const at::Tensor& x, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& v_init,
                         const c10::optional<at::Tensor>& s_init, double alpha, double threshold,
                         double b_th, double slope, bool sparse, NeuronKinds kinds) {
  const int surrogate = kinds.surrogate, reset = kinds.reset;
  const int64_t T = x.size(0), B = x.size(1), n_out = weight.size(0);
  const auto int_opts = x.options().dtype(at::kInt);
  const auto long_opts = x.options().dtype(at::kLong);

  const auto scan = scan_events<scalar_t>(x);
  const ScannedEvents& ev = scan->ev;
  const RowCurrent<scalar_t> current(x, weight, bias, *scan);

  auto spikes = at::empty({T, B, n_out}, x.options());
  auto v_final = at::empty({B, n_out}, x.options());
  at::Tensor sg_dense = sparse ? at::empty({0}, x.options()) : at::empty({T, B, n_out}, x.options());
  at::Tensor act_cnt = at::empty({sparse ? B * T : 0}, int_opts);
  // Reset to zero: the backward needs the spikes that reset V (rst_bits, op_schemas.h).
  at::Tensor rst_bits = at::empty({reset == kResetZero ? T * B * bit_words(n_out) : 0}, int_opts);
  if (reset == kResetZero) rst_bits = rst_bits.view({T, B, bit_words(n_out)});

  LifForwardArgs<scalar_t> a;
  a.current = &current;
  a.T = T; a.B = B; a.n_out = n_out;
  a.alpha = alpha; a.threshold = threshold; a.b_th = b_th; a.slope = slope;
  a.v_init = v_init.has_value() ? v_init->data_ptr<scalar_t>() : nullptr;
  a.s_init = s_init.has_value() ? s_init->data_ptr<scalar_t>() : nullptr;
  a.spikes = spikes.data_ptr<scalar_t>();
  a.v_final = v_final.data_ptr<scalar_t>();
  a.sg_dense = sparse ? nullptr : sg_dense.data_ptr<scalar_t>();
  a.act_cnt = sparse ? act_cnt.data_ptr<int32_t>() : nullptr;
  a.rst_bits = reset == kResetZero ? rst_bits.data_ptr<int32_t>() : nullptr;

  RowLists<scalar_t> act_rows(T, sparse ? B : 0, a.act_cnt);
  std::vector<int64_t> fired(B, 0);
  const int64_t work_per_b = T * (current.width + ev.nnz / std::max<int64_t>(B * T, 1) * current.width / 8);
  profile::Scope timer(profile::kFwdRows);
  at::parallel_for(0, B, grain_for(work_per_b), [&](int64_t b0, int64_t b1) {
    c10::optional<CompactAppender<scalar_t>> act;
    if (sparse) act.emplace(kScratchIdxB, kScratchValB);
    CompactAppender<scalar_t>* ap = act.has_value() ? &*act : nullptr;
    fired[b0] = dispatch_lif_rows<scalar_t>(reset, surrogate, a, b0, b1, ap, &act_rows);
    if (ap) act_rows.finish(*ap, b0, b1);
  });

  timer.next(profile::kFwdGatherActive);
  int64_t total_spikes = 0;
  for (int64_t b = 0; b < B; ++b) total_spikes += fired[b];
  auto stats = at::empty({3}, long_opts);
  int64_t* st = stats.data_ptr<int64_t>();
  st[0] = total_spikes;
  st[2] = ev.nnz;

  if (!sparse) {
    st[1] = T * B * n_out;
    auto empty_int = [&] { return at::empty({0}, int_opts); };
    return {spikes, v_final, empty_int(), empty_int(), sg_dense, empty_int(), empty_int(),
            at::empty({0}, x.options()), rst_bits, stats};
  }
  std::vector<int64_t> act_off(B * T + 1);
  int64_t* off = act_off.data();
  offsets_from_counts(act_cnt.data_ptr<int32_t>(), B * T, off);
  const int64_t n_active = off[B * T];
  st[1] = n_active;
  auto act_idx = at::empty({n_active}, int_opts);
  auto act_sg = at::empty({n_active}, x.options());
  gather_rows<scalar_t>(act_rows, off, B, act_idx.data_ptr<int32_t>(), act_sg.data_ptr<scalar_t>());
  return {spikes, v_final, act_cnt, act_idx, act_sg, ev.cnt, ev.idx, ev.val, rst_bits, stats};
}

Outputs lif_forward_cpu(const at::Tensor& x_in, const at::Tensor& weight_in,
                        const c10::optional<at::Tensor>& bias_in,
                        const c10::optional<at::Tensor>& v_init_in,
                        const c10::optional<at::Tensor>& s_init_in,
                        const c10::optional<at::Tensor>& /*x_act_cnt: used by the backward*/,
                        const c10::optional<at::Tensor>& /*x_act_idx*/, double alpha,
                        double threshold, double b_th, double slope, bool sparse,
                        c10::string_view surrogate, c10::string_view reset) {
  const NeuronKinds kinds = check_lif_forward_args(x_in, weight_in, bias_in, v_init_in, s_init_in,
                                                   alpha, threshold, b_th, slope, surrogate, reset);
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  Outputs out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lif_forward_cpu", [&] {
    out = lif_forward_impl<scalar_t>(x, weight, contiguous(bias_in), contiguous(v_init_in),
                                     contiguous(s_init_in), alpha, threshold, b_th, slope, sparse, kinds);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsegrad, CPU, m) { m.impl("lif_forward", SG_FLOAT32_MATH(lif_forward_cpu)); }

}  // namespace cpu
}  // namespace sparsegrad
