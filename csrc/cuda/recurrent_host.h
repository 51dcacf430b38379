// Host side of the recurrent LIF layer's CUDA ops (rlif_*), written once over a Launcher as
// host_ops.h is: compiled by csrc/cuda/sparsegrad_cuda.cu for the GPU and by
// csrc/emul/emul_ops.cpp for the host emulation. Kernels: csrc/cuda/recurrent.cuh.
//
// Launches: the forward and both backwards launch one kernel per time step (the recurrence
// couples the neurons of a batch element from step to step; the kernels use no barriers).
// Host synchronisation (device -> host copies), each sizing an output: the forward's, as
// lif_forward's (the number of input events and whether x is binary; in sparse mode the number
// of active entries). The backwards never synchronise (every size is a tensor's numel).
// Determinism: no float atomics. dW is a segment sum over the input events grouped by input
// (stable sort), dR a scan of each neuron's spike bits, one thread per output element; db, dV,
// dS and the dense-mode GEMMs are ATen reductions and GEMMs.
#pragma once

#include "cuda/host_ops.h"
#include "cuda/recurrent.cuh"

namespace sparsegrad {
namespace cuda {
namespace host {

using RlifOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                               at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using RlifGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// int64 offsets [rows + 1] of int32 per-row counts (a device-side scan, no host copy).
inline at::Tensor offsets_of(const at::Tensor& cnt) {
  at::Tensor off = at::zeros({cnt.numel() + 1}, cnt.options().dtype(at::kLong));
  if (cnt.numel() > 0) off.narrow(0, 1, cnt.numel()).copy_(at::cumsum(cnt, 0, at::kLong));
  return off;
}

// ------------------------------------------------------------------------------------------------
// rlif_forward, rlif_param_forward
// ------------------------------------------------------------------------------------------------
// What rlif_param_forward adds (absent for the float op): the synaptic current and, when some
// parameter needs its gradient (keep), the traces P, Q, U at the active entries (dense mode: at
// every entry; U only with the synaptic current) and P, Q, R, U after the last step.
struct RlifParamForwardIO {
  const at::Tensor* alpha_syn = nullptr;  // [N] or null: no synaptic current
  c10::optional<at::Tensor> syn_init;
  bool keep = false;
  at::Tensor syn_final, trace[3], tan_last;  // outputs (empty where absent)
};

template <class L, typename scalar_t, typename Param>
RlifOutputs rlif_forward_impl(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& rec,
                              const c10::optional<at::Tensor>& bias,
                              const c10::optional<at::Tensor>& v_init,
                              const c10::optional<at::Tensor>& s_init, Param alpha, Param threshold,
                              double b_th, double slope, bool sparse, NeuronKinds kinds,
                              RlifParamForwardIO* prm = nullptr) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kParams = is_param_view<Param>();
  const int64_t T = x.size(0), B = x.size(1), n = weight.size(0), words = bit_words(n), R = B * T;
  const auto acc_opts = acc_options(x);
  const auto int_opts = x.options().dtype(at::kInt);
  const auto long_opts = x.options().dtype(at::kLong);

  const Events ev = build_events<L, scalar_t>(x);
  CurrentPlan<scalar_t> plan(x, weight, bias, ev);
  const at::Tensor rec_t = rec.t().contiguous();
  at::Tensor v = v_init.has_value() ? v_init->to(acc_opts.dtype()).clone() : at::zeros({B, n}, acc_opts);
  auto spikes = at::empty({T, B, n}, x.options());
  auto bits = at::zeros({T, B, words}, int_opts);
  at::Tensor v_trace = sparse ? at::empty({T, B, n}, acc_opts) : at::empty({0}, acc_opts);
  at::Tensor sg_dense = sparse ? at::empty({0}, x.options()) : at::empty({T, B, n}, x.options());

  RlifStepArgs<scalar_t, Param> a;
  a.current = plan.current;
  a.T = T;
  a.B = B;
  a.n = n;
  a.words = words;
  a.alpha = alpha;
  a.threshold = threshold;
  a.slope = static_cast<acc_t>(slope);
  a.surrogate = kinds.surrogate;
  a.reset = kinds.reset;
  a.rec_t = rec_t.data_ptr<scalar_t>();
  a.s_init = ptr_or_null<scalar_t>(s_init);
  a.v = v.data_ptr<acc_t>();
  a.spikes = spikes.data_ptr<scalar_t>();
  a.bits = bits.data_ptr<int32_t>();
  a.v_trace = sparse ? v_trace.data_ptr<acc_t>() : nullptr;
  a.sg_dense = sparse ? nullptr : sg_dense.data_ptr<scalar_t>();
  // tensor parameters: the synaptic current's state, the traces' state and their values at
  // every entry (the outputs in dense mode, scratch for the gather at the active set otherwise)
  at::Tensor syn, tan, trace_all[3];
  const bool syn_on = kParams && prm->alpha_syn != nullptr;
  if constexpr (kParams) {
    a.alpha_syn = Param{acc_t(0), syn_on ? prm->alpha_syn->data_ptr<acc_t>() : nullptr};
    if (syn_on) {
      syn = prm->syn_init.has_value() ? prm->syn_init->to(acc_opts.dtype()).clone()
                                      : at::zeros({B, n}, acc_opts);
      a.syn = syn.data_ptr<acc_t>();
    }
    if (prm->keep) {
      tan = at::zeros({4, B, n}, acc_opts);
      a.tan = tan.data_ptr<acc_t>();
      for (int q = 0; q < (syn_on ? 3 : 2); ++q) {
        trace_all[q] = at::empty({T, B, n}, x.options());
        a.trace[q] = trace_all[q].data_ptr<scalar_t>();
      }
    }
  }
  for (int64_t t = 0; t < T; ++t) L::launch(B * n, &rlif_forward_step_kernel<scalar_t, Param>, a, t);
  at::Tensor v_final = v.to(x.scalar_type());
  const auto empty_x = at::empty({0}, x.options());
  if constexpr (kParams) {
    prm->syn_final = syn_on ? syn.to(x.scalar_type()) : empty_x;
    prm->tan_last = prm->keep ? tan.to(x.scalar_type()) : empty_x.clone();
    for (int q = 0; q < 3; ++q)
      prm->trace[q] = sparse || !trace_all[q].defined() ? empty_x.clone() : trace_all[q];
  }

  auto stats = at::zeros({3}, long_opts);
  stats.narrow(0, 0, 1).copy_(at::count_nonzero(spikes).reshape({1}));
  stats.narrow(0, 2, 1).fill_(ev.nnz);
  const auto empty_int = at::empty({0}, int_opts);
  if (!sparse) {
    stats.narrow(0, 1, 1).fill_(T * B * n);
    return {spikes, v_final, empty_int, empty_int.clone(), sg_dense, empty_int.clone(),
            empty_int.clone(), empty_x.clone(), bits, stats};
  }
  // Compact the active set: count kernel, scan, one device->host copy (its size), fill kernel.
  // (Per-neuron thresholds: the neuron op's row kernels, which also gather the traces.)
  auto act_cnt = at::empty({R}, int_opts);
  if constexpr (kParams)
    L::launch(R, &neuron_active_count_kernel<acc_t>, v_trace.data_ptr<acc_t>(), T, B, n, threshold,
              static_cast<acc_t>(b_th), act_cnt.data_ptr<int32_t>());
  else
    launch_warps<L>(R, &rlif_active_count_kernel<acc_t>, v_trace.data_ptr<acc_t>(), T, B, n,
                    threshold.value, static_cast<acc_t>(b_th), act_cnt.data_ptr<int32_t>());
  const at::Tensor act_off = offsets_of(act_cnt);
  const int64_t n_active = act_off[R].item<int64_t>();  // host sync: output size
  auto act_idx = at::empty({n_active}, int_opts);
  auto act_sg = at::empty({n_active}, x.options());
  if constexpr (kParams) {
    TraceCopy<scalar_t> gather;
    for (int q = 0; q < 3; ++q)
      if (trace_all[q].defined()) {
        prm->trace[q] = at::empty({n_active}, x.options());
        gather.src[q] = trace_all[q].data_ptr<scalar_t>();
        gather.dst[q] = prm->trace[q].data_ptr<scalar_t>();
      }
    L::launch(R, &neuron_active_fill_kernel<scalar_t, acc_t>, v_trace.data_ptr<acc_t>(), T, B, n,
              threshold, static_cast<acc_t>(b_th), a.slope, a.surrogate, act_off.data_ptr<int64_t>(),
              act_idx.data_ptr<int32_t>(), act_sg.data_ptr<scalar_t>(), static_cast<scalar_t*>(nullptr),
              acc_t(0), a.reset, gather);
  } else {
    launch_warps<L>(R, &active_fill_kernel<scalar_t, acc_t>, v_trace.data_ptr<acc_t>(), T, B, n,
                    threshold.value, static_cast<acc_t>(b_th), a.slope, a.surrogate,
                    act_off.data_ptr<int64_t>(), act_idx.data_ptr<int32_t>(), act_sg.data_ptr<scalar_t>());
  }
  stats.narrow(0, 1, 1).fill_(n_active);
  return {spikes, v_final, act_cnt, act_idx, act_sg, ev.cnt, ev.idx, ev.val, bits, stats};
}

template <class L>
RlifOutputs rlif_forward(const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& rec_in,
                         const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& v_init,
                         const c10::optional<at::Tensor>& s_init,
                         const c10::optional<at::Tensor>& /*x_act_cnt: used by the backward*/,
                         const c10::optional<at::Tensor>& /*x_act_idx*/, double alpha,
                         double threshold, double b_th, double slope, bool sparse,
                         c10::string_view surrogate, c10::string_view reset) {
  const NeuronKinds kinds = check_rlif_forward_args(x_in, weight_in, rec_in, bias, v_init, s_init, alpha,
                                                  threshold, b_th, slope, surrogate, reset);
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous(), rec = rec_in.contiguous();
  RlifOutputs out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparsegrad_rlif_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    out = rlif_forward_impl<L, scalar_t>(x, weight, rec, contiguous(bias), contiguous(v_init),
                                         contiguous(s_init), ScalarParam<acc_t>{acc_t(alpha)},
                                         ScalarParam<acc_t>{acc_t(threshold)}, b_th, slope, sparse,
                                         kinds);
  });
  return out;
}

using RlifParamOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                    at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                    at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The tensor-parameter forward: rlif_forward's outputs with syn_final after v_final and act_p,
// act_q, act_u, tan_last after act_sg (the CPU op's layout).
template <class L>
RlifParamOutputs rlif_param_forward(const at::Tensor& x_in, const at::Tensor& weight_in,
                                    const at::Tensor& rec_in, const c10::optional<at::Tensor>& bias,
                                    const c10::optional<at::Tensor>& v_init,
                                    const c10::optional<at::Tensor>& s_init,
                                    const c10::optional<at::Tensor>& syn_init,
                                    const c10::optional<at::Tensor>& /*x_act_cnt*/,
                                    const c10::optional<at::Tensor>& /*x_act_idx*/,
                                    const at::Tensor& alpha_in, const at::Tensor& threshold_in,
                                    const c10::optional<at::Tensor>& alpha_syn_in, double b_th,
                                    double slope, bool sparse, c10::string_view surrogate,
                                    c10::string_view reset, bool need_dparams) {
  const NeuronKinds kinds = check_rlif_param_forward_args(x_in, weight_in, rec_in, bias, v_init, s_init,
                                                        syn_init, alpha_in, threshold_in, alpha_syn_in,
                                                        b_th, slope, surrogate, reset);
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous(), rec = rec_in.contiguous();
  const at::Tensor alpha = alpha_in.contiguous(), threshold = threshold_in.contiguous();
  const c10::optional<at::Tensor> alpha_syn = contiguous(alpha_syn_in);
  RlifParamForwardIO prm;
  prm.alpha_syn = alpha_syn.has_value() ? &*alpha_syn : nullptr;
  prm.syn_init = contiguous(syn_init);
  prm.keep = need_dparams;
  RlifOutputs out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparsegrad_rlif_param_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    out = rlif_forward_impl<L, scalar_t>(
        x, weight, rec, contiguous(bias), contiguous(v_init), contiguous(s_init),
        ParamView<acc_t>{acc_t(0), alpha.data_ptr<acc_t>()},
        ParamView<acc_t>{acc_t(0), threshold.data_ptr<acc_t>()}, b_th, slope, sparse, kinds, &prm);
  });
  auto& [spikes, v_final, act_cnt, act_idx, act_sg, ev_cnt, ev_idx, ev_val, bits, stats] = out;
  return {spikes, v_final, prm.syn_final, act_cnt, act_idx, act_sg, prm.trace[0], prm.trace[1],
          prm.trace[2], prm.tan_last, ev_cnt, ev_idx, ev_val, bits, stats};
}

// ------------------------------------------------------------------------------------------------
// The reverse walk and what both backwards compute from G the same way
// ------------------------------------------------------------------------------------------------
// What the tensor-parameter backwards add (absent for the float ops): the per-neuron alpha, the
// synaptic current (alpha_syn, dL/dsyn_final; dL/dsyn_init out when need_dsyn) and, when need,
// the forward's traces and the parameter gradients per batch element [B, N].
struct RlifParamGradIO {
  const at::Tensor* alpha = nullptr;      // [N]
  const at::Tensor* alpha_syn = nullptr;  // [N] or null
  c10::optional<at::Tensor> grad_syn_final;
  const at::Tensor* trace[3] = {nullptr, nullptr, nullptr};  // P, Q, U, laid out as the surrogate
  const at::Tensor* tan_last = nullptr;   // [4, B, N]
  bool need = false, need_dsyn = false;
  at::Tensor gv0;                          // G_V[0] [B, N] (acc) with a synaptic current
  at::Tensor dsyn, dparam[3];              // outputs: dsyn_init, d_alpha, d_threshold, d_alpha_syn
};

// The float API's alpha on the host (a tensor parameter's values may live on the device: the
// state gradients then read prm->alpha).
template <typename acc_t>
double scalar_value(ScalarParam<acc_t> p) { return static_cast<double>(p.value); }
template <typename acc_t>
double scalar_value(ParamView<acc_t>) { return 0.0; }

// G_I at every entry [T, B, N] (acc) by one launch per step; with prm, also G_V[0] (synaptic
// current) and the accumulated parameter gradients [3, B, N] (acc, into *dparam_acc).
template <class L, typename scalar_t, typename Param>
at::Tensor rlif_reverse_walk(const at::Tensor& gS, const c10::optional<at::Tensor>& gV,
                             const at::Tensor& rec, const RlifEntries<scalar_t>& entries,
                             Param alpha, ResetKind reset, RlifParamGradIO* prm = nullptr,
                             at::Tensor* dparam_acc = nullptr) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = gS.size(0), B = gS.size(1), n = gS.size(2);
  const auto acc_opts = acc_options(gS);
  at::Tensor G = at::empty({T, B, n}, acc_opts);  // every element is written below
  RlifBackStepArgs<scalar_t, Param> a;
  a.T = T;
  a.B = B;
  a.n = n;
  a.alpha = alpha;
  a.reset = reset;
  a.entries = entries;
  a.grad = gS.data_ptr<scalar_t>();
  a.g_init = ptr_or_null<scalar_t>(gV);
  a.rec = rec.data_ptr<scalar_t>();
  a.G = G.data_ptr<acc_t>();
  if constexpr (is_param_view<Param>()) {
    if (prm->alpha_syn) {
      a.alpha_syn = Param{acc_t(0), prm->alpha_syn->data_ptr<acc_t>()};
      a.g_syn = ptr_or_null<scalar_t>(prm->grad_syn_final);
      prm->gv0 = at::empty({B, n}, acc_opts);
      a.gv = prm->gv0.data_ptr<acc_t>();
    }
    if (prm->need) {
      *dparam_acc = at::empty({3, B, n}, acc_opts);
      a.dparam = dparam_acc->data_ptr<acc_t>();
      for (int q = 0; q < 3; ++q)
        a.trace[q] = prm->trace[q]->numel() ? prm->trace[q]->data_ptr<scalar_t>() : nullptr;
      L::launch(B * n, &rlif_param_grads_init_kernel<scalar_t, Param>, a,
                static_cast<const scalar_t*>(prm->tan_last->data_ptr<scalar_t>()));
    }
  }
  for (int64_t t = T - 1; t >= 0; --t) L::launch(B * n, &rlif_backward_step_kernel<scalar_t, Param>, a, t);
  return G;
}

// db, dv_init, ds_init, the s_init part of dR (into drec, [N, N]) from G and, with prm, dsyn_init
// and the parameter gradients (dparam_acc, from the walk). T = 0: the final state is the initial
// one, and S[-1] reaches nothing.
inline void rlif_state_grads(const at::Tensor& G, const c10::optional<at::Tensor>& gV,
                             const at::Tensor& rec, const c10::optional<at::Tensor>& s_init,
                             double alpha, ResetKind reset, const at::TensorOptions& opts,
                             bool need_db, bool need_dv, bool need_ds, at::Tensor* db,
                             at::Tensor* dv, at::Tensor* ds, at::Tensor* drec,
                             RlifParamGradIO* prm = nullptr, const at::Tensor* dparam_acc = nullptr) {
  const int64_t T = G.size(0), B = G.size(1), n = G.size(2);
  const bool syn = prm && prm->alpha_syn;
  auto given = [&](const c10::optional<at::Tensor>& g) {
    return g.has_value() ? g->clone() : at::zeros({B, n}, opts);
  };
  if (need_db) *db = G.sum(at::IntArrayRef{0, 1}).to(opts.dtype());
  if (prm && prm->need)
    for (int q = 0; q < 3; ++q)
      prm->dparam[q] = q < 2 || syn ? (*dparam_acc)[q].to(opts.dtype()).contiguous() : at::empty({0}, opts);
  if (T == 0) {
    if (need_dv) *dv = given(gV);
    if (need_ds) *ds = at::zeros({B, n}, opts);
    if (syn && prm->need_dsyn) prm->dsyn = given(prm->grad_syn_final);
    return;
  }
  const at::Tensor G0 = G[0];  // G_I[0]
  if (need_dv) {  // dL/dV_init = d * G_V[0], d = alpha (times 1 - s_init under reset "zero")
    const at::Tensor gv0 = syn ? prm->gv0 : G0;
    at::Tensor keep = prm ? gv0 * prm->alpha->to(G.scalar_type()) : gv0 * alpha;
    if (reset == kResetZero && s_init.has_value()) keep = keep * (1 - s_init->to(G.scalar_type()));
    *dv = keep.to(opts.dtype()).contiguous();
  }
  if (need_ds) *ds = at::mm(G0, rec.to(G.scalar_type())).to(opts.dtype());
  if (drec && drec->defined() && s_init.has_value())
    drec->add_(at::mm(G0.t(), s_init->to(G.scalar_type())));
  if (syn && prm->need_dsyn)  // syn[0] = alpha_syn * syn_init + I[0]
    prm->dsyn = (G0 * prm->alpha_syn->to(G.scalar_type())).to(opts.dtype()).contiguous();
}

// Full dx = G W (a GEMM: dx is then wanted at every entry anyway).
inline at::Tensor rlif_full_dx(const at::Tensor& G, const at::Tensor& weight, const at::TensorOptions& opts) {
  const int64_t T = G.size(0), B = G.size(1), n = G.size(2);
  return at::mm(G.view({T * B, n}), weight.to(G.scalar_type())).view({T, B, weight.size(1)}).to(opts.dtype());
}

// Entries grouped by column (stable: within a column they keep their order): offsets [cols+1],
// the G row of each entry and its value, both permuted.
struct ColumnGroups {
  at::Tensor off, g_row, val;
};

inline ColumnGroups group_by_column(const at::Tensor& col, const at::Tensor& g_row, const at::Tensor& val,
                                    int64_t cols) {
  ColumnGroups out;
  const auto sorted = at::sort(col, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor& keys = std::get<0>(sorted);
  const at::Tensor& perm = std::get<1>(sorted);
  out.off = at::searchsorted(keys, at::arange(cols + 1, col.options()));
  out.g_row = g_row.index_select(0, perm);
  out.val = val.numel() > 0 ? val.index_select(0, perm) : val;
  return out;
}

template <class L, typename scalar_t>
at::Tensor column_sums(const ColumnGroups& groups, int64_t cols, const at::Tensor& G) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = G.size(2);
  at::Tensor out = at::empty({cols, n}, G.options());
  L::launch(cols * n, &rlif_column_sum_kernel<scalar_t>, groups.off.data_ptr<int64_t>(),
            groups.g_row.data_ptr<int64_t>(),
            groups.val.numel() > 0 ? groups.val.data_ptr<scalar_t>() : static_cast<const scalar_t*>(nullptr),
            cols, n, static_cast<const acc_t*>(G.data_ptr<acc_t>()), out.data_ptr<acc_t>());
  return out;
}


// ------------------------------------------------------------------------------------------------
// rlif_backward_sparse, rlif_param_backward_sparse
// ------------------------------------------------------------------------------------------------
template <class L, typename scalar_t, typename Param>
RlifGrads rlif_backward_sparse_impl(const at::Tensor& gS, const c10::optional<at::Tensor>& gV,
                                    const at::Tensor& weight, const at::Tensor& rec,
                                    const c10::optional<at::Tensor>& s_init, const at::Tensor& act_cnt,
                                    const at::Tensor& act_idx, const at::Tensor& act_sg,
                                    const at::Tensor& ev_cnt, const at::Tensor& ev_idx,
                                    const at::Tensor& ev_val, const at::Tensor& bits,
                                    const c10::optional<at::Tensor>& prev_cnt,
                                    const c10::optional<at::Tensor>& prev_idx, Param alpha,
                                    ResetKind reset, bool need_dx, bool need_dw, bool need_drec,
                                    bool need_db, bool need_dv, bool need_ds,
                                    RlifParamGradIO* prm = nullptr, const char* op = "rlif_backward_sparse") {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = gS.size(0), B = gS.size(1), n = weight.size(0), n_in = weight.size(1);
  const int64_t words = bit_words(n);
  const auto opts = gS.options();
  at::Tensor dx = at::empty({0}, opts), dw = dx.clone(), drec = dx.clone(), db = dx.clone(),
             dv = dx.clone(), ds = dx.clone();
  const bool extra = prm && (prm->need || (prm->need_dsyn && prm->alpha_syn));
  if (!(need_dx || need_dw || need_drec || need_db || need_dv || need_ds || extra))
    return {dx, dw, drec, db, dv, ds};

  // The compact tensors are checked on the device as the LIF ops' (prepare_csr, no host
  // synchronisation): the kernels then read only clamped offsets, in-range rows and columns,
  // and a raised flag poisons every gradient (NaN on the GPU, an error in the emulation).
  static const char* const kNames[3] = {"act_cnt/act_idx", "ev_cnt/ev_idx", "prev_cnt/prev_idx"};
  const int64_t R = B * T;
  const at::Tensor flag = at::zeros({1}, opts.dtype(at::kInt));
  const DeviceCsr act = prepare_csr<L>(act_cnt, act_idx, R, n, flag, 0, op, "act_cnt");
  const at::Tensor act_off = safe_offsets(act);
  RlifEntries<scalar_t> entries;
  entries.act_off = act_off.data_ptr<int64_t>();
  entries.act_idx = act_idx.data_ptr<int32_t>();
  entries.act_sg = act_sg.data_ptr<scalar_t>();
  entries.bits = bits.data_ptr<int32_t>();
  entries.words = words;
  at::Tensor dparam_acc;
  const at::Tensor G = rlif_reverse_walk<L, scalar_t>(gS, gV, rec, entries, alpha, reset, prm, &dparam_acc);

  if (need_dx) {
    if (prev_cnt.has_value()) {  // only on the producer's active set
      at::Tensor dx_acc = at::zeros({T, B, n_in}, G.options());
      const DeviceCsr prev = prepare_csr<L>(*prev_cnt, *prev_idx, R, n_in, flag, 2, op, "prev_cnt");
      const at::Tensor rows = safe_rows(prev), cols = safe_columns(prev);
      L::launch(prev.n, &rlif_dx_restricted_kernel<scalar_t>, rows.data_ptr<int64_t>(),
                cols.data_ptr<int32_t>(), prev.n, T, B, n, n_in,
                static_cast<const acc_t*>(G.data_ptr<acc_t>()), weight.data_ptr<scalar_t>(),
                dx_acc.data_ptr<acc_t>());
      dx = dx_acc.to(opts.dtype());
    } else {
      dx = rlif_full_dx(G, weight, opts);
    }
  }
  if (need_dw) {  // dW^T[i, :] = sum over the events (t, b, i) of x * G[t, b, :]
    const DeviceCsr ev = prepare_csr<L>(ev_cnt, ev_idx, R, n_in, flag, 1, op, "ev_cnt");
    // (columns out of range fall outside every column group; unusable rows read row 0)
    const at::Tensor r = safe_rows(ev);
    const at::Tensor g_row = at::remainder(r, T) * B + at::floor_divide(r, T);
    const ColumnGroups groups = group_by_column(ev.idx, g_row, ev_val, n_in);
    dw = column_sums<L, scalar_t>(groups, n_in, G).t().to(opts.dtype()).contiguous();
  }
  if (need_drec) {  // dR^T[i, :] = sum over the spikes (t < T-1, b, i) of G[t+1, b, :]
    at::Tensor drec_t = at::empty({n, n}, G.options());
    L::launch(n * n, &rlif_drec_kernel<scalar_t>, bits.data_ptr<int32_t>(), std::max<int64_t>(T - 1, 0) * B,
              words, B, n, static_cast<const acc_t*>(G.data_ptr<acc_t>()), drec_t.data_ptr<acc_t>());
    drec = drec_t.t().contiguous();
  }
  rlif_state_grads(G, gV, rec, s_init, scalar_value(alpha), reset, opts, need_db, need_dv, need_ds, &db, &dv, &ds,
                   need_drec ? &drec : nullptr, prm, &dparam_acc);
  if (need_drec) drec = drec.to(opts.dtype());
  if (prm)
    finish_with_flag<L, scalar_t>(flag, {dx, dw, drec, db, dv, ds, prm->dsyn, prm->dparam[0],
                                         prm->dparam[1], prm->dparam[2]}, op, kNames);
  else
    finish_with_flag<L, scalar_t>(flag, {dx, dw, drec, db, dv, ds}, op, kNames);
  return {dx, dw, drec, db, dv, ds};
}

template <class L>
RlifGrads rlif_backward_sparse(const at::Tensor& grad_spikes, const c10::optional<at::Tensor>& grad_v_final,
                               const at::Tensor& weight, const at::Tensor& rec_weight,
                               const c10::optional<at::Tensor>& s_init, const at::Tensor& act_cnt,
                               const at::Tensor& act_idx, const at::Tensor& act_sg,
                               const at::Tensor& ev_cnt, const at::Tensor& ev_idx,
                               const at::Tensor& ev_val, const at::Tensor& spk_bits,
                               const c10::optional<at::Tensor>& prev_cnt,
                               const c10::optional<at::Tensor>& prev_idx, double alpha,
                               c10::string_view reset_name, bool need_dx, bool need_dw,
                               bool need_drec, bool need_db, bool need_dv, bool need_ds) {
  // (no offsets from the checks: row_offsets validates on the host, the GPU's checks run on the
  // device, in the emulation too)
  const ResetKind reset = check_rlif_backward_sparse_args(
      grad_spikes, grad_v_final, weight, rec_weight, s_init, act_cnt, act_idx, act_sg, ev_cnt,
      ev_idx, ev_val, spk_bits, prev_cnt, prev_idx, alpha, reset_name, nullptr, nullptr, nullptr);
  RlifGrads out;
  AT_DISPATCH_FLOATING_TYPES(grad_spikes.scalar_type(), "sparsegrad_rlif_backward_sparse_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    out = rlif_backward_sparse_impl<L, scalar_t>(
        grad_spikes.contiguous(), contiguous(grad_v_final), weight.contiguous(),
        rec_weight.contiguous(), contiguous(s_init), act_cnt.contiguous(), act_idx.contiguous(),
        act_sg.contiguous(), ev_cnt.contiguous(), ev_idx.contiguous(), ev_val.contiguous(),
        spk_bits.contiguous(), contiguous(prev_cnt), contiguous(prev_idx),
        ScalarParam<acc_t>{acc_t(alpha)}, reset, need_dx, need_dw, need_drec, need_db, need_dv, need_ds);
  });
  return out;
}

using RlifParamGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                  at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The tensor-parameter backwards' inputs, contiguous, and the RlifParamGradIO that views them
// (not copyable: io points into the members).
struct RlifParamInputs {
  at::Tensor alpha, trace[3], tan_last;
  c10::optional<at::Tensor> alpha_syn;
  RlifParamGradIO io;

  RlifParamInputs(const at::Tensor& alpha_in, const c10::optional<at::Tensor>& alpha_syn_in,
                  const c10::optional<at::Tensor>& grad_syn_final, const at::Tensor& act_p,
                  const at::Tensor& act_q, const at::Tensor& act_u, const at::Tensor& tan_last_in,
                  bool need_dsyn, bool need_dparams)
      : alpha(alpha_in.contiguous()),
        trace{act_p.contiguous(), act_q.contiguous(), act_u.contiguous()},
        tan_last(tan_last_in.contiguous()),
        alpha_syn(contiguous(alpha_syn_in)) {
    io.alpha = &alpha;
    io.alpha_syn = alpha_syn.has_value() ? &*alpha_syn : nullptr;
    io.grad_syn_final = contiguous(grad_syn_final);
    for (int q = 0; q < 3; ++q) io.trace[q] = &trace[q];
    io.tan_last = &tan_last;
    io.need = need_dparams;
    io.need_dsyn = need_dsyn;
  }
  RlifParamInputs(const RlifParamInputs&) = delete;
  RlifParamInputs& operator=(const RlifParamInputs&) = delete;
};

// The tensor-parameter outputs: the float backward's gradients, then dsyn_init, d_alpha,
// d_threshold, d_alpha_syn (per batch element [B, N]; empty where not wanted), as the CPU op's.
inline RlifParamGrads param_grads_out(const RlifGrads& g, RlifParamGradIO& prm, const at::TensorOptions& opts) {
  const auto& [dx, dw, drec, db, dv, ds] = g;
  auto filled = [&](const at::Tensor& t) { return t.defined() ? t : at::empty({0}, opts); };
  return {dx, dw, drec, db, dv, ds, filled(prm.dsyn), filled(prm.dparam[0]), filled(prm.dparam[1]),
          filled(prm.dparam[2])};
}

template <class L>
RlifParamGrads rlif_param_backward_sparse(
    const at::Tensor& grad_spikes, const c10::optional<at::Tensor>& grad_v_final,
    const c10::optional<at::Tensor>& grad_syn_final, const at::Tensor& weight,
    const at::Tensor& rec_weight, const c10::optional<at::Tensor>& s_init,
    const at::Tensor& act_cnt, const at::Tensor& act_idx, const at::Tensor& act_sg,
    const at::Tensor& act_p, const at::Tensor& act_q, const at::Tensor& act_u,
    const at::Tensor& tan_last, const at::Tensor& ev_cnt, const at::Tensor& ev_idx,
    const at::Tensor& ev_val, const at::Tensor& spk_bits, const c10::optional<at::Tensor>& prev_cnt,
    const c10::optional<at::Tensor>& prev_idx, const at::Tensor& alpha_in,
    const c10::optional<at::Tensor>& alpha_syn_in, c10::string_view reset_name, bool need_dx,
    bool need_dw, bool need_drec, bool need_db, bool need_dv, bool need_ds, bool need_dsyn,
    bool need_dparams) {
  const char* op = "rlif_param_backward_sparse";
  const ResetKind reset = check_rlif_backward_sparse_args(
      grad_spikes, grad_v_final, weight, rec_weight, s_init, act_cnt, act_idx, act_sg, ev_cnt,
      ev_idx, ev_val, spk_bits, prev_cnt, prev_idx, 0.5, reset_name, nullptr, nullptr, nullptr, op);
  check_rlif_param_grad_inputs(grad_spikes, grad_syn_final, alpha_in, alpha_syn_in, act_p, act_q,
                               act_u, tan_last, need_dsyn, need_dparams, act_idx.numel(),
                               weight.size(0), op);
  RlifParamInputs in(alpha_in, alpha_syn_in, grad_syn_final, act_p, act_q, act_u, tan_last,
                     need_dsyn, need_dparams);
  RlifGrads out;
  AT_DISPATCH_FLOATING_TYPES(grad_spikes.scalar_type(), "sparsegrad_rlif_param_backward_sparse_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    out = rlif_backward_sparse_impl<L, scalar_t>(
        grad_spikes.contiguous(), contiguous(grad_v_final), weight.contiguous(),
        rec_weight.contiguous(), contiguous(s_init), act_cnt.contiguous(), act_idx.contiguous(),
        act_sg.contiguous(), ev_cnt.contiguous(), ev_idx.contiguous(), ev_val.contiguous(),
        spk_bits.contiguous(), contiguous(prev_cnt), contiguous(prev_idx),
        ParamView<acc_t>{acc_t(0), in.alpha.data_ptr<acc_t>()}, reset, need_dx, need_dw, need_drec,
        need_db, need_dv, need_ds, &in.io, op);
  });
  return param_grads_out(out, in.io, grad_spikes.options());
}

// ------------------------------------------------------------------------------------------------
// rlif_backward_dense, rlif_param_backward_dense: the same reverse walk over every entry, then
// GEMMs through ATen.
// ------------------------------------------------------------------------------------------------
template <class L, typename scalar_t, typename Param>
RlifGrads rlif_backward_dense_impl(const at::Tensor& gS, const c10::optional<at::Tensor>& gV,
                                   const at::Tensor& x, const at::Tensor& weight, const at::Tensor& rec,
                                   const c10::optional<at::Tensor>& s_init, const at::Tensor& spikes,
                                   const at::Tensor& sg, Param alpha, ResetKind reset, bool need_dx,
                                   bool need_dw, bool need_drec, bool need_db, bool need_dv,
                                   bool need_ds, RlifParamGradIO* prm = nullptr) {
  const int64_t T = gS.size(0), B = gS.size(1), n = weight.size(0), n_in = weight.size(1);
  const auto opts = gS.options();
  at::Tensor dx = at::empty({0}, opts), dw = dx.clone(), drec = dx.clone(), db = dx.clone(),
             dv = dx.clone(), ds = dx.clone();
  RlifEntries<scalar_t> entries;
  entries.sg = sg.data_ptr<scalar_t>();
  entries.spikes = spikes.data_ptr<scalar_t>();
  at::Tensor dparam_acc;
  const at::Tensor G = rlif_reverse_walk<L, scalar_t>(gS, gV, rec, entries, alpha, reset, prm, &dparam_acc);
  const auto acc = G.scalar_type();
  const at::Tensor G2 = G.view({T * B, n});
  if (need_dx) dx = rlif_full_dx(G, weight, opts);
  if (need_dw) dw = at::mm(G2.t(), x.view({T * B, n_in}).to(acc)).to(opts.dtype());
  if (need_drec) {  // dR = sum_t G[t+1]^T S[t]
    const int64_t steps = std::max<int64_t>(T - 1, 0);
    drec = at::mm(G.narrow(0, std::min<int64_t>(1, T), steps).reshape({steps * B, n}).t(),
                  spikes.narrow(0, 0, steps).reshape({steps * B, n}).to(acc));
  }
  rlif_state_grads(G, gV, rec, s_init, scalar_value(alpha), reset, opts, need_db, need_dv, need_ds, &db, &dv, &ds,
                   need_drec ? &drec : nullptr, prm, &dparam_acc);
  if (need_drec) drec = drec.to(opts.dtype());
  return {dx, dw, drec, db, dv, ds};
}

template <class L>
RlifGrads rlif_backward_dense(const at::Tensor& grad_spikes, const c10::optional<at::Tensor>& grad_v_final,
                              const at::Tensor& x_in, const at::Tensor& weight_in,
                              const at::Tensor& rec_in, const c10::optional<at::Tensor>& s_init_in,
                              const at::Tensor& spikes_in, const at::Tensor& sg_in, double alpha,
                              c10::string_view reset_name, bool need_dx, bool need_dw, bool need_drec,
                              bool need_db, bool need_dv, bool need_ds) {
  const ResetKind reset = check_rlif_backward_dense_args(grad_spikes, grad_v_final, x_in, weight_in,
                                                         rec_in, s_init_in, spikes_in, sg_in, alpha,
                                                         reset_name);
  RlifGrads out;
  AT_DISPATCH_FLOATING_TYPES(grad_spikes.scalar_type(), "sparsegrad_rlif_backward_dense_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    out = rlif_backward_dense_impl<L, scalar_t>(
        grad_spikes.contiguous(), contiguous(grad_v_final), x_in.contiguous(), weight_in.contiguous(),
        rec_in.contiguous(), contiguous(s_init_in), spikes_in.contiguous(), sg_in.contiguous(),
        ScalarParam<acc_t>{acc_t(alpha)}, reset, need_dx, need_dw, need_drec, need_db, need_dv, need_ds);
  });
  return out;
}

template <class L>
RlifParamGrads rlif_param_backward_dense(
    const at::Tensor& grad_spikes, const c10::optional<at::Tensor>& grad_v_final,
    const c10::optional<at::Tensor>& grad_syn_final, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& rec, const c10::optional<at::Tensor>& s_init, const at::Tensor& spikes,
    const at::Tensor& sg, const at::Tensor& act_p, const at::Tensor& act_q, const at::Tensor& act_u,
    const at::Tensor& tan_last, const at::Tensor& alpha_in, const c10::optional<at::Tensor>& alpha_syn_in,
    c10::string_view reset_name, bool need_dx, bool need_dw, bool need_drec, bool need_db,
    bool need_dv, bool need_ds, bool need_dsyn, bool need_dparams) {
  const char* op = "rlif_param_backward_dense";
  const ResetKind reset = check_rlif_backward_dense_args(grad_spikes, grad_v_final, x, weight, rec,
                                                         s_init, spikes, sg, 0.5, reset_name, op);
  check_rlif_param_grad_inputs(grad_spikes, grad_syn_final, alpha_in, alpha_syn_in, act_p, act_q,
                               act_u, tan_last, need_dsyn, need_dparams, grad_spikes.numel(),
                               weight.size(0), op);
  RlifParamInputs in(alpha_in, alpha_syn_in, grad_syn_final, act_p, act_q, act_u, tan_last,
                     need_dsyn, need_dparams);
  RlifGrads out;
  AT_DISPATCH_FLOATING_TYPES(grad_spikes.scalar_type(), "sparsegrad_rlif_param_backward_dense_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    out = rlif_backward_dense_impl<L, scalar_t>(
        grad_spikes.contiguous(), contiguous(grad_v_final), x.contiguous(), weight.contiguous(),
        rec.contiguous(), contiguous(s_init), spikes.contiguous(), sg.contiguous(),
        ParamView<acc_t>{acc_t(0), in.alpha.data_ptr<acc_t>()}, reset, need_dx, need_dw, need_drec,
        need_db, need_dv, need_ds, &in.io);
  });
  return param_grads_out(out, in.io, grad_spikes.options());
}

}  // namespace host
}  // namespace cuda
}  // namespace sparsegrad
