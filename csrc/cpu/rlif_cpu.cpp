// The recurrent LIF layer's ops on the CPU: rlif_forward, rlif_backward_sparse,
// rlif_backward_dense, and their tensor-parameter versions rlif_param_* (per-neuron alpha,
// threshold, the synaptic current; the same walks, cpu/recurrent_walk.h, over ParamView).
#include <torch/library.h>

#include "low_precision.h"

#include "cpu/recurrent_walk.h"

namespace sparsegrad {
namespace cpu {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                           at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using ParamOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                at::Tensor, at::Tensor, at::Tensor>;
using ParamGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                              at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The tensor-parameter forward's extras (ParamView only): the synaptic current (syn_init in,
// syn_final out) and the traces P, Q, U per active entry (dense mode: [T, B, N]; U only with
// the synaptic current) and P, Q, R, U after the last step [4, B, N], kept when `keep`.
struct TraceOut {
  bool keep = false;
  bool syn = false;
  c10::optional<at::Tensor> syn_init;
  at::Tensor syn_final, act_p, act_q, act_u, tan_last;
};

template <typename acc_t>
ParamView<acc_t> param_view(const at::Tensor& t) {
  return ParamView<acc_t>{acc_t(0), t.data_ptr<acc_t>()};
}

template <typename acc_t>
ParamView<acc_t> param_view(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? param_view<acc_t>(*t) : ParamView<acc_t>{acc_t(0), nullptr};
}

template <typename scalar_t, typename Param>
Outputs rlif_forward_impl(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& rec,
                          const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& v_init,
                          const c10::optional<at::Tensor>& s_init, Param alpha, Param threshold,
                          double b_th, double slope, bool sparse, NeuronKinds kinds,
                          TraceOut* traces = nullptr, Param alpha_syn = {}) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kTraces = is_param_view<Param>();
  const int64_t T = x.size(0), B = x.size(1), n = weight.size(0), words = bit_words(n);
  const auto int_opts = x.options().dtype(at::kInt);

  Events ev = build_events<scalar_t>(x);
  CurrentPlan<scalar_t> plan(x, weight, bias, ev);
  const at::Tensor rec_t = rec.t().contiguous();

  RlifForward<scalar_t, Param> a;
  a.T = T; a.B = B; a.n = n; a.words = words;
  a.alpha = alpha; a.threshold = threshold; a.b_th = b_th; a.slope = slope;
  a.surrogate = kinds.surrogate; a.reset = kinds.reset;
  a.sparse = sparse;
  a.rec_t = rec_t.data_ptr<scalar_t>();
  a.v_init = ptr_or_null<scalar_t>(v_init);
  a.s_init = ptr_or_null<scalar_t>(s_init);
  auto spikes = at::empty({T, B, n}, x.options());
  auto v_final = at::empty({B, n}, x.options());
  auto bits = at::zeros({T, B, words}, int_opts);
  at::Tensor dense_sg = sparse ? at::empty({0}, x.options()) : at::empty({T, B, n}, x.options());
  a.spikes = spikes.data_ptr<scalar_t>();
  a.v_final = v_final.data_ptr<scalar_t>();
  a.bits = bits.data_ptr<int32_t>();
  a.sg_dense = sparse ? nullptr : dense_sg.data_ptr<scalar_t>();
  if constexpr (kTraces) {
    const auto empty = at::empty({0}, x.options());
    a.keep_traces = traces->keep;
    a.syn = traces->syn;
    a.alpha_syn = alpha_syn;
    a.syn_init = ptr_or_null<scalar_t>(traces->syn_init);
    traces->syn_final = traces->syn ? at::empty({B, n}, x.options()) : empty;
    a.syn_final = traces->syn ? traces->syn_final.data_ptr<scalar_t>() : nullptr;
    traces->act_p = empty.clone();
    traces->act_q = empty.clone();
    traces->act_u = empty.clone();
    traces->tan_last = empty.clone();
    if (traces->keep) {
      traces->tan_last = at::empty({4, B, n}, x.options());
      a.tan_last = traces->tan_last.data_ptr<scalar_t>();
      if (!sparse) {
        at::Tensor* dense[3] = {&traces->act_p, &traces->act_q, &traces->act_u};
        for (int k = 0; k < (traces->syn ? 3 : 2); ++k) {
          *dense[k] = at::empty({T, B, n}, x.options());
          a.trace_dense[k] = dense[k]->data_ptr<scalar_t>();
        }
      }
    }
  }
  std::vector<RlifTraces<scalar_t>> tr(kTraces ? B : 0);

  std::vector<std::vector<int32_t>> act_idx(sparse ? B : 0);
  std::vector<std::vector<scalar_t>> act_sg(sparse ? B : 0);
  auto act_cnt = at::zeros({sparse ? B * T : 0}, int_opts);
  int32_t* cnt = sparse ? act_cnt.data_ptr<int32_t>() : nullptr;
  std::vector<int64_t> spike_count(B, 0);
  const int64_t work_per_b = T * n * 4 + ev.nnz / std::max<int64_t>(B, 1) * n;
  at::parallel_for(0, B, grain_for(work_per_b), [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> v(n), s(n), cur(n);
    std::vector<int32_t> fired;
    std::vector<int32_t> no_idx;
    std::vector<scalar_t> no_sg;
    for (int64_t b = b0; b < b1; ++b)
      spike_count[b] = rlif_forward_element<scalar_t>(a, plan.current, b, sparse ? act_idx[b] : no_idx,
                                                      sparse ? act_sg[b] : no_sg, cnt, v, s, cur, fired,
                                                      kTraces ? &tr[b] : nullptr);
  });

  auto stats = at::empty({3}, x.options().dtype(at::kLong));
  int64_t* st = stats.data_ptr<int64_t>();
  st[0] = 0;
  for (int64_t b = 0; b < B; ++b) st[0] += spike_count[b];
  st[2] = ev.nnz;
  const auto empty_int = at::empty({0}, int_opts);
  if (!sparse) {
    st[1] = T * B * n;
    return {spikes, v_final, empty_int, empty_int.clone(), dense_sg, empty_int.clone(),
            empty_int.clone(), at::empty({0}, x.options()), bits, stats};
  }
  // Concatenate the per-element lists in batch order: rows b*T + t are then in CSR order.
  std::vector<int64_t> base(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) base[b + 1] = base[b] + static_cast<int64_t>(act_idx[b].size());
  st[1] = base[B];
  auto idx_out = at::empty({base[B]}, int_opts);
  auto sg_out = at::empty({base[B]}, x.options());
  int32_t* ip = idx_out.data_ptr<int32_t>();
  scalar_t* sp = sg_out.data_ptr<scalar_t>();
  scalar_t* trace_out[3] = {nullptr, nullptr, nullptr};  // P, Q, U per active entry
  if constexpr (kTraces) {
    if (traces->keep) {
      at::Tensor* outs[3] = {&traces->act_p, &traces->act_q, &traces->act_u};
      for (int k = 0; k < (traces->syn ? 3 : 2); ++k) {
        *outs[k] = at::empty({base[B]}, x.options());
        trace_out[k] = outs[k]->data_ptr<scalar_t>();
      }
    }
  }
  at::parallel_for(0, B, grain_for(T + base[B] / std::max<int64_t>(B, 1)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      std::copy(act_idx[b].begin(), act_idx[b].end(), ip + base[b]);
      std::copy(act_sg[b].begin(), act_sg[b].end(), sp + base[b]);
      if constexpr (kTraces)
        for (int k = 0; k < 3; ++k)
          if (trace_out[k]) std::copy(tr[b].act[k].begin(), tr[b].act[k].end(), trace_out[k] + base[b]);
    }
  });
  return {spikes, v_final, act_cnt, idx_out, sg_out, ev.cnt, ev.idx, ev.val, bits, stats};
}

Outputs rlif_forward_cpu(const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& rec_in,
                         const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& v_init,
                         const c10::optional<at::Tensor>& s_init,
                         const c10::optional<at::Tensor>& /*x_act_cnt: used by the backward*/,
                         const c10::optional<at::Tensor>& /*x_act_idx*/, double alpha,
                         double threshold, double b_th, double slope, bool sparse,
                         c10::string_view surrogate, c10::string_view reset) {
  const NeuronKinds kinds = check_rlif_forward_args(x_in, weight_in, rec_in, bias, v_init, s_init, alpha,
                                                  threshold, b_th, slope, surrogate, reset);
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous(), rec = rec_in.contiguous();
  Outputs out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rlif_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    out = rlif_forward_impl<scalar_t>(x, weight, rec, contiguous(bias), contiguous(v_init),
                                      contiguous(s_init), ScalarParam<acc_t>{acc_t(alpha)},
                                      ScalarParam<acc_t>{acc_t(threshold)}, b_th, slope, sparse, kinds);
  });
  return out;
}

// The tensor-parameter forward: the outputs of rlif_forward with syn_final after v_final and
// act_p, act_q, act_u, tan_last after act_sg.
ParamOutputs rlif_param_forward_cpu(const at::Tensor& x_in, const at::Tensor& weight_in,
                                    const at::Tensor& rec_in, const c10::optional<at::Tensor>& bias,
                                    const c10::optional<at::Tensor>& v_init,
                                    const c10::optional<at::Tensor>& s_init,
                                    const c10::optional<at::Tensor>& syn_init,
                                    const c10::optional<at::Tensor>& /*x_act_cnt*/,
                                    const c10::optional<at::Tensor>& /*x_act_idx*/,
                                    const at::Tensor& alpha, const at::Tensor& threshold,
                                    const c10::optional<at::Tensor>& alpha_syn, double b_th,
                                    double slope, bool sparse, c10::string_view surrogate,
                                    c10::string_view reset, bool need_dparams) {
  const NeuronKinds kinds = check_rlif_param_forward_args(x_in, weight_in, rec_in, bias, v_init, s_init,
                                                        syn_init, alpha, threshold, alpha_syn, b_th,
                                                        slope, surrogate, reset);
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous(), rec = rec_in.contiguous();
  const at::Tensor a = alpha.contiguous(), th = threshold.contiguous();
  const c10::optional<at::Tensor> as = contiguous(alpha_syn);
  Outputs out;
  TraceOut tr;
  tr.keep = need_dparams;
  tr.syn = alpha_syn.has_value();
  tr.syn_init = contiguous(syn_init);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rlif_param_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    out = rlif_forward_impl<scalar_t>(x, weight, rec, contiguous(bias), contiguous(v_init),
                                      contiguous(s_init), param_view<acc_t>(a), param_view<acc_t>(th),
                                      b_th, slope, sparse, kinds, &tr, param_view<acc_t>(as));
  });
  auto& [spikes, v_final, act_cnt, act_idx, act_sg, ev_cnt, ev_idx, ev_val, bits, stats] = out;
  return {spikes, v_final, tr.syn_final, act_cnt, act_idx, act_sg, tr.act_p, tr.act_q, tr.act_u,
          tr.tan_last, ev_cnt, ev_idx, ev_val, bits, stats};
}

// dx on the producer's active set costs |A_prev| * N dot products; dx everywhere through the
// input-space trace costs N_in per injection (and per spike under reset "zero") plus one N_in-wide
// decay per (b, t). Both are correct (the producer reads dx only on its set): take the cheaper.
bool restrict_dx(int64_t n_prev, int64_t n_inject, int64_t T, int64_t B, int64_t n_in, int64_t n) {
  return double(n_prev) * double(n) <= (double(n_inject) + 0.25 * double(T) * double(B)) * double(n_in);
}

// The extra inputs and outputs of the tensor-parameter backwards (null: the float API): the
// synaptic current (alpha_syn, dL/dsyn_final; dL/dsyn_init out when need_dsyn), the forward's
// traces and the parameter gradients per batch element [B, N] (when need).
struct ParamGradIO {
  at::Tensor act_p, act_q, act_u, tan_last;
  c10::optional<at::Tensor> alpha_syn, grad_syn_final;
  bool need = false, need_dsyn = false;
  at::Tensor dsyn, d_alpha, d_threshold, d_alpha_syn;  // outputs

  // Allocates the outputs (empty where not wanted).
  void allocate(int64_t B, int64_t n, const at::TensorOptions& opts) {
    const bool syn = alpha_syn.has_value();
    const auto empty = at::empty({0}, opts);
    dsyn = syn && need_dsyn ? at::empty({B, n}, opts) : empty;
    d_alpha = need ? at::empty({B, n}, opts) : empty.clone();
    d_threshold = need ? at::empty({B, n}, opts) : empty.clone();
    d_alpha_syn = need && syn ? at::empty({B, n}, opts) : empty.clone();
  }

  // The walks' view of it (after allocate).
  template <typename scalar_t>
  RlifParamIO<scalar_t, ParamView<at::opmath_type<scalar_t>>> view() const {
    using acc_t = at::opmath_type<scalar_t>;
    auto ptr = [](const at::Tensor& t) { return t.numel() ? t.data_ptr<scalar_t>() : nullptr; };
    RlifParamIO<scalar_t, ParamView<acc_t>> io;
    io.syn = alpha_syn.has_value();
    io.alpha_syn = param_view<acc_t>(alpha_syn);
    io.g_syn = ptr_or_null<scalar_t>(grad_syn_final);
    io.dsyn = ptr(dsyn);
    if (need) {
      io.trace[0] = ptr(act_p);
      io.trace[1] = ptr(act_q);
      io.trace[2] = io.syn ? ptr(act_u) : nullptr;
      io.tan_last = ptr(tan_last);
      io.d_param[0] = ptr(d_alpha);
      io.d_param[1] = ptr(d_threshold);
      io.d_param[2] = ptr(d_alpha_syn);
    }
    return io;
  }
};

template <typename scalar_t, typename Param>
Grads rlif_backward_sparse_impl(const at::Tensor& gS, const c10::optional<at::Tensor>& gV,
                                const at::Tensor& weight, const at::Tensor& rec,
                                const c10::optional<at::Tensor>& s_init, const at::Tensor& act_off,
                                const at::Tensor& act_idx, const at::Tensor& act_sg,
                                const at::Tensor& ev_off, const at::Tensor& ev_idx,
                                const at::Tensor& ev_val, const at::Tensor& bits,
                                const c10::optional<at::Tensor>& prev_off,
                                const c10::optional<at::Tensor>& prev_idx, Param alpha, ResetKind reset,
                                bool need_dx, bool need_dw, bool need_drec, bool need_db,
                                bool need_dv, bool need_ds, ParamGradIO* prm = nullptr) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = gS.size(0), B = gS.size(1), n = weight.size(0), n_in = weight.size(1);
  const auto opts = gS.options();
  const auto acc_opts = opts.dtype(c10::CppTypeToScalarType<acc_t>::value);
  const BatchChunks chunks(B);

  RlifBackward<scalar_t, Param> p;
  p.T = T; p.B = B; p.n_in = n_in; p.n = n; p.words = bit_words(n);
  p.alpha = alpha;
  const bool need_dparams = prm && prm->need;
  const bool need_dsyn = prm && prm->need_dsyn && prm->alpha_syn.has_value();
  if constexpr (is_param_view<Param>()) {
    prm->allocate(B, n, opts);
    p.prm = prm->view<scalar_t>();
  }
  p.reset = reset;
  p.grad = gS.data_ptr<scalar_t>();
  p.g_init = ptr_or_null<scalar_t>(gV);
  p.act_off = act_off.data_ptr<int64_t>();
  p.act_idx = act_idx.data_ptr<int32_t>();
  p.act_sg = act_sg.data_ptr<scalar_t>();
  p.events = EventView<scalar_t>(ev_off, ev_idx, ev_val, T);
  p.bits = bits.data_ptr<int32_t>();
  p.s_init = ptr_or_null<scalar_t>(s_init);
  const at::Tensor rec_t = rec.t().contiguous();
  p.rec_t = rec_t.data_ptr<scalar_t>();
  at::Tensor weight_t;
  const int64_t n_inject = act_idx.numel() + (reset == kResetZero ? T * B : 0);
  if (need_dx && prev_off.has_value() && restrict_dx(prev_idx->numel(), n_inject, T, B, n_in, n)) {
    weight_t = weight.t().contiguous();
    p.weight_t = weight_t.data_ptr<scalar_t>();
    p.prev_off = prev_off->data_ptr<int64_t>();
    p.prev_idx = prev_idx->data_ptr<int32_t>();
  } else {
    p.weight = weight.data_ptr<scalar_t>();
  }

  auto empty = at::empty({0}, opts);
  at::Tensor dx = need_dx ? at::zeros({T, B, n_in}, opts) : empty;
  at::Tensor dv = need_dv ? at::empty({B, n}, opts) : empty.clone();
  at::Tensor ds = need_ds ? at::empty({B, n}, opts) : empty.clone();
  at::Tensor dw_parts, drec_parts, db_parts;
  p.dx = need_dx ? dx.data_ptr<scalar_t>() : nullptr;
  p.dv = need_dv ? dv.data_ptr<scalar_t>() : nullptr;
  p.ds = need_ds ? ds.data_ptr<scalar_t>() : nullptr;
  const int64_t n_pad = padded_row<acc_t>(n);  // the partials' rows: whole 64-byte tiles
  if (need_dw) {
    dw_parts = at::zeros({chunks.count, n_in * n_pad}, acc_opts);
    p.dw_t_parts = dw_parts.data_ptr<acc_t>();
  }
  if (need_drec) {
    drec_parts = at::zeros({chunks.count, n * n_pad}, acc_opts);
    p.drec_t_parts = drec_parts.data_ptr<acc_t>();
  }
  if (need_db) {
    db_parts = at::zeros({chunks.count, n}, acc_opts);
    p.db_parts = db_parts.data_ptr<acc_t>();
  }
  if (need_dx || need_dw || need_drec || need_db || need_dv || need_ds || need_dparams || need_dsyn)
    rlif_backward_walk<scalar_t>(p);

  // [chunks, rows, n_pad] partials -> [n, rows]: out[j, i] = sum over chunks in order
  auto reduce = [&](const at::Tensor& parts, int64_t rows) {
    at::Tensor out = at::empty({n, rows}, opts);
    const acc_t* src = parts.data_ptr<acc_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const int64_t count = parts.size(0), stride = rows * n_pad;
    at::parallel_for(0, rows, 64, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t j = 0; j < n; ++j) {
          acc_t sum = 0;
          for (int64_t c = 0; c < count; ++c) sum += src[c * stride + i * n_pad + j];
          dst[j * rows + i] = static_cast<scalar_t>(sum);
        }
    });
    return out;
  };
  at::Tensor dw = need_dw ? reduce(dw_parts, n_in) : empty.clone();
  at::Tensor drec = need_drec ? reduce(drec_parts, n) : empty.clone();
  at::Tensor db = empty.clone();
  if (need_db) {
    db = at::empty({n}, opts);
    reduce_chunks<acc_t>(db_parts.data_ptr<acc_t>(), chunks.count, n, acc_t(1), db.data_ptr<scalar_t>());
  }
  return {dx, dw, drec, db, dv, ds};
}

// Both sparse backwards after their checks: alpha_t (the per-neuron alpha) and prm null for the
// float API.
Grads rlif_backward_sparse_dispatch(
    const at::Tensor& gS, const c10::optional<at::Tensor>& gV, const at::Tensor& weight,
    const at::Tensor& rec, const c10::optional<at::Tensor>& s_init, const at::Tensor& act_off,
    const at::Tensor& act_idx, const at::Tensor& act_sg, const at::Tensor& ev_off,
    const at::Tensor& ev_idx, const at::Tensor& ev_val, const at::Tensor& bits,
    const c10::optional<at::Tensor>& prev_off, const c10::optional<at::Tensor>& prev_idx,
    double alpha, const at::Tensor* alpha_t, ResetKind reset, bool need_dx, bool need_dw,
    bool need_drec, bool need_db, bool need_dv, bool need_ds, ParamGradIO* prm) {
  const at::Tensor a = alpha_t ? alpha_t->contiguous() : at::Tensor();
  Grads out;
  AT_DISPATCH_FLOATING_TYPES(gS.scalar_type(), "rlif_backward_sparse_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto run = [&](auto param, ParamGradIO* io) {
      return rlif_backward_sparse_impl<scalar_t>(
          gS.contiguous(), contiguous(gV), weight.contiguous(), rec.contiguous(), contiguous(s_init),
          act_off, act_idx.contiguous(), act_sg.contiguous(), ev_off, ev_idx.contiguous(),
          ev_val.contiguous(), bits.contiguous(), prev_off, contiguous(prev_idx), param, reset,
          need_dx, need_dw, need_drec, need_db, need_dv, need_ds, io);
    };
    out = alpha_t ? run(param_view<acc_t>(a), prm) : run(ScalarParam<acc_t>{static_cast<acc_t>(alpha)}, nullptr);
  });
  return out;
}

Grads rlif_backward_sparse_cpu(const at::Tensor& grad_spikes, const c10::optional<at::Tensor>& grad_v_final,
                               const at::Tensor& weight, const at::Tensor& rec_weight,
                               const c10::optional<at::Tensor>& s_init, const at::Tensor& act_cnt,
                               const at::Tensor& act_idx, const at::Tensor& act_sg,
                               const at::Tensor& ev_cnt, const at::Tensor& ev_idx,
                               const at::Tensor& ev_val, const at::Tensor& spk_bits,
                               const c10::optional<at::Tensor>& prev_cnt,
                               const c10::optional<at::Tensor>& prev_idx, double alpha,
                               c10::string_view reset_name, bool need_dx, bool need_dw,
                               bool need_drec, bool need_db, bool need_dv, bool need_ds) {
  at::Tensor act_off, ev_off;
  c10::optional<at::Tensor> prev_off;
  const ResetKind reset = check_rlif_backward_sparse_args(
      grad_spikes, grad_v_final, weight, rec_weight, s_init, act_cnt, act_idx, act_sg, ev_cnt,
      ev_idx, ev_val, spk_bits, prev_cnt, prev_idx, alpha, reset_name, &act_off, &ev_off, &prev_off);
  return rlif_backward_sparse_dispatch(grad_spikes, grad_v_final, weight, rec_weight, s_init, act_off,
                                       act_idx, act_sg, ev_off, ev_idx, ev_val, spk_bits, prev_off,
                                       prev_idx, alpha, nullptr, reset, need_dx, need_dw, need_drec,
                                       need_db, need_dv, need_ds, nullptr);
}

// The tensor-parameter outputs: rlif_backward_*'s gradients, then dsyn_init, d_alpha,
// d_threshold, d_alpha_syn (per batch element [B, N]; empty where not wanted).
ParamGrads param_grads_out(Grads& g, const ParamGradIO& prm) {
  auto& [dx, dw, drec, db, dv, ds] = g;
  return {dx, dw, drec, db, dv, ds, prm.dsyn, prm.d_alpha, prm.d_threshold, prm.d_alpha_syn};
}

// The tensor-parameter sparse backward: act_p, act_q (act_u with alpha_syn) one value per
// active entry.
ParamGrads rlif_param_backward_sparse_cpu(
    const at::Tensor& grad_spikes, const c10::optional<at::Tensor>& grad_v_final,
    const c10::optional<at::Tensor>& grad_syn_final, const at::Tensor& weight,
    const at::Tensor& rec_weight, const c10::optional<at::Tensor>& s_init,
    const at::Tensor& act_cnt, const at::Tensor& act_idx, const at::Tensor& act_sg,
    const at::Tensor& act_p, const at::Tensor& act_q, const at::Tensor& act_u,
    const at::Tensor& tan_last, const at::Tensor& ev_cnt, const at::Tensor& ev_idx,
    const at::Tensor& ev_val, const at::Tensor& spk_bits, const c10::optional<at::Tensor>& prev_cnt,
    const c10::optional<at::Tensor>& prev_idx, const at::Tensor& alpha,
    const c10::optional<at::Tensor>& alpha_syn, c10::string_view reset_name, bool need_dx,
    bool need_dw, bool need_drec, bool need_db, bool need_dv, bool need_ds, bool need_dsyn,
    bool need_dparams) {
  const char* op = "rlif_param_backward_sparse";
  at::Tensor act_off, ev_off;
  c10::optional<at::Tensor> prev_off;
  const ResetKind reset = check_rlif_backward_sparse_args(
      grad_spikes, grad_v_final, weight, rec_weight, s_init, act_cnt, act_idx, act_sg, ev_cnt,
      ev_idx, ev_val, spk_bits, prev_cnt, prev_idx, 0.5, reset_name, &act_off, &ev_off, &prev_off, op);
  check_rlif_param_grad_inputs(grad_spikes, grad_syn_final, alpha, alpha_syn, act_p, act_q, act_u,
                               tan_last, need_dsyn, need_dparams, act_idx.numel(), weight.size(0), op);
  ParamGradIO prm{act_p.contiguous(), act_q.contiguous(), act_u.contiguous(), tan_last.contiguous(),
                  contiguous(alpha_syn), contiguous(grad_syn_final), need_dparams, need_dsyn};
  Grads out = rlif_backward_sparse_dispatch(grad_spikes, grad_v_final, weight, rec_weight, s_init,
                                            act_off, act_idx, act_sg, ev_off, ev_idx, ev_val,
                                            spk_bits, prev_off, prev_idx, 0.5, &alpha, reset, need_dx,
                                            need_dw, need_drec, need_db, need_dv, need_ds, &prm);
  return param_grads_out(out, prm);
}

// Both dense backwards: alpha_t (the per-neuron alpha) null for the float API.
Grads rlif_backward_dense_common(const at::Tensor& grad_spikes, const c10::optional<at::Tensor>& grad_v_final,
                                 const at::Tensor& x_in, const at::Tensor& weight_in,
                                 const at::Tensor& rec_in, const c10::optional<at::Tensor>& s_init_in,
                                 const at::Tensor& spikes_in, const at::Tensor& sg_in, double alpha,
                                 const at::Tensor* alpha_t, ResetKind reset, bool need_dx, bool need_dw,
                                 bool need_drec, bool need_db, bool need_dv, bool need_ds,
                                 ParamGradIO* prm = nullptr) {
  const int64_t T = grad_spikes.size(0), B = grad_spikes.size(1), n = weight_in.size(0),
                n_in = weight_in.size(1);
  const auto opts = grad_spikes.options();
  const c10::optional<at::Tensor> gV = contiguous(grad_v_final), s_init = contiguous(s_init_in);
  const at::Tensor rec = rec_in.contiguous(), spikes = spikes_in.contiguous();
  const at::Tensor a = alpha_t ? alpha_t->contiguous() : at::Tensor();
  // G_I at every entry (G_V without a synaptic current), and G_V[0] with one
  at::Tensor G = at::empty({T, B, n}, opts);
  const bool syn = prm && prm->alpha_syn.has_value();
  at::Tensor gv0 = syn ? at::empty({B, n}, opts) : at::Tensor();
  if (prm) prm->allocate(B, n, opts);
  AT_DISPATCH_FLOATING_TYPES(grad_spikes.scalar_type(), "rlif_backward_dense_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor rec_t = rec.t().contiguous();
    auto walk = [&](auto param, auto dp) {
      rlif_dense_walk<scalar_t>(grad_spikes.contiguous().data_ptr<scalar_t>(),
                                sg_in.contiguous().data_ptr<scalar_t>(), spikes.data_ptr<scalar_t>(),
                                ptr_or_null<scalar_t>(gV), rec_t.data_ptr<scalar_t>(), T, B, n, param,
                                reset, G.data_ptr<scalar_t>(), dp);
    };
    if (alpha_t == nullptr) {
      walk(ScalarParam<acc_t>{static_cast<acc_t>(alpha)}, RlifParamIO<scalar_t, ScalarParam<acc_t>>{});
    } else {
      auto dp = prm->view<scalar_t>();
      dp.dsyn = nullptr;  // from G_I[0] below
      dp.gv0 = syn ? gv0.data_ptr<scalar_t>() : nullptr;
      walk(param_view<acc_t>(a), dp);
    }
  });
  auto empty = at::empty({0}, opts);
  auto G2 = G.view({T * B, n});
  at::Tensor dx = need_dx ? at::mm(G2, weight_in.contiguous()).view({T, B, n_in}) : empty;
  at::Tensor dw = need_dw ? at::mm(G2.t(), x_in.contiguous().view({T * B, n_in})) : empty.clone();
  at::Tensor db = need_db ? G2.sum(0) : empty.clone();
  at::Tensor drec = empty.clone(), dv = empty.clone(), ds = empty.clone();
  if (T == 0) {  // the final state is the initial one; S[-1] reaches nothing
    auto given = [&](const c10::optional<at::Tensor>& g) {
      return g.has_value() ? g->clone() : at::zeros({B, n}, opts);
    };
    if (need_drec) drec = at::zeros({n, n}, opts);
    if (need_dv) dv = given(gV);
    if (need_ds) ds = at::zeros({B, n}, opts);
    if (syn && prm->dsyn.numel()) prm->dsyn.copy_(given(prm->grad_syn_final));
    return {dx, dw, drec, db, dv, ds};
  }
  if (need_drec) {  // dR = sum_t G_I[t+1]^T S[t] (+ G_I[0]^T s_init)
    drec = at::mm(G.narrow(0, 1, T - 1).reshape({(T - 1) * B, n}).t(),
                  spikes.narrow(0, 0, T - 1).reshape({(T - 1) * B, n}));
    if (s_init.has_value()) drec = drec + at::mm(G[0].t(), *s_init);
  }
  if (need_dv) {
    const at::Tensor gv_0 = syn ? gv0 : G[0];
    dv = alpha_t ? gv_0 * a : gv_0 * alpha;
    if (reset == kResetZero && s_init.has_value()) dv = dv * (1 - *s_init);
    dv = dv.contiguous();
  }
  if (need_ds) ds = at::mm(G[0], rec);
  if (syn && prm->dsyn.numel()) prm->dsyn.copy_(G[0] * *prm->alpha_syn);  // syn[0] = alpha_syn*syn_init + I[0]
  return {dx, dw, drec, db, dv, ds};
}

Grads rlif_backward_dense_cpu(const at::Tensor& grad_spikes, const c10::optional<at::Tensor>& grad_v_final,
                              const at::Tensor& x_in, const at::Tensor& weight_in,
                              const at::Tensor& rec_in, const c10::optional<at::Tensor>& s_init_in,
                              const at::Tensor& spikes_in, const at::Tensor& sg_in, double alpha,
                              c10::string_view reset_name, bool need_dx, bool need_dw, bool need_drec,
                              bool need_db, bool need_dv, bool need_ds) {
  const ResetKind reset = check_rlif_backward_dense_args(grad_spikes, grad_v_final, x_in, weight_in,
                                                         rec_in, s_init_in, spikes_in, sg_in, alpha,
                                                         reset_name);
  return rlif_backward_dense_common(grad_spikes, grad_v_final, x_in, weight_in, rec_in, s_init_in,
                                    spikes_in, sg_in, alpha, nullptr, reset, need_dx, need_dw,
                                    need_drec, need_db, need_dv, need_ds);
}

// The tensor-parameter dense backward: act_p, act_q (act_u) are the forward's traces at every
// entry.
ParamGrads rlif_param_backward_dense_cpu(
    const at::Tensor& grad_spikes, const c10::optional<at::Tensor>& grad_v_final,
    const c10::optional<at::Tensor>& grad_syn_final, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& rec, const c10::optional<at::Tensor>& s_init, const at::Tensor& spikes,
    const at::Tensor& sg, const at::Tensor& act_p, const at::Tensor& act_q, const at::Tensor& act_u,
    const at::Tensor& tan_last, const at::Tensor& alpha, const c10::optional<at::Tensor>& alpha_syn,
    c10::string_view reset_name, bool need_dx, bool need_dw, bool need_drec, bool need_db,
    bool need_dv, bool need_ds, bool need_dsyn, bool need_dparams) {
  const char* op = "rlif_param_backward_dense";
  const ResetKind reset = check_rlif_backward_dense_args(grad_spikes, grad_v_final, x, weight, rec,
                                                         s_init, spikes, sg, 0.5, reset_name, op);
  check_rlif_param_grad_inputs(grad_spikes, grad_syn_final, alpha, alpha_syn, act_p, act_q, act_u,
                               tan_last, need_dsyn, need_dparams, grad_spikes.numel(), weight.size(0), op);
  ParamGradIO prm{act_p.contiguous(), act_q.contiguous(), act_u.contiguous(), tan_last.contiguous(),
                  contiguous(alpha_syn), contiguous(grad_syn_final), need_dparams, need_dsyn};
  Grads out = rlif_backward_dense_common(grad_spikes, grad_v_final, x, weight, rec, s_init, spikes,
                                         sg, 0.5, &alpha, reset, need_dx, need_dw, need_drec,
                                         need_db, need_dv, need_ds, &prm);
  return param_grads_out(out, prm);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsegrad, CPU, m) {
  m.impl("rlif_forward", SG_FLOAT32_MATH(rlif_forward_cpu));
  m.impl("rlif_backward_sparse", SG_FLOAT32_MATH(rlif_backward_sparse_cpu));
  m.impl("rlif_backward_dense", SG_FLOAT32_MATH(rlif_backward_dense_cpu));
  m.impl("rlif_param_forward", SG_FLOAT32_MATH(rlif_param_forward_cpu));
  m.impl("rlif_param_backward_sparse", SG_FLOAT32_MATH(rlif_param_backward_sparse_cpu));
  m.impl("rlif_param_backward_dense", SG_FLOAT32_MATH(rlif_param_backward_dense_cpu));
}

}  // namespace cpu
}  // namespace sparsegrad
