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
// rlif_forward
// ------------------------------------------------------------------------------------------------
template <class L, typename scalar_t>
RlifOutputs rlif_forward_impl(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& rec,
                              const c10::optional<at::Tensor>& bias,
                              const c10::optional<at::Tensor>& v_init,
                              const c10::optional<at::Tensor>& s_init, double alpha,
                              double threshold, double b_th, double slope, bool sparse,
                              NeuronKinds kinds) {
  using acc_t = at::opmath_type<scalar_t>;
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

  RlifStepArgs<scalar_t> a;
  a.current = plan.current;
  a.T = T;
  a.B = B;
  a.n = n;
  a.words = words;
  a.alpha = static_cast<acc_t>(alpha);
  a.threshold = static_cast<acc_t>(threshold);
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
  for (int64_t t = 0; t < T; ++t) L::launch(B * n, &rlif_forward_step_kernel<scalar_t>, a, t);
  at::Tensor v_final = v.to(x.scalar_type());

  auto stats = at::zeros({3}, long_opts);
  stats.narrow(0, 0, 1).copy_(at::count_nonzero(spikes).reshape({1}));
  stats.narrow(0, 2, 1).fill_(ev.nnz);
  const auto empty_int = at::empty({0}, int_opts);
  if (!sparse) {
    stats.narrow(0, 1, 1).fill_(T * B * n);
    return {spikes, v_final, empty_int, empty_int.clone(), sg_dense, empty_int.clone(),
            empty_int.clone(), at::empty({0}, x.options()), bits, stats};
  }
  // Compact the active set: count kernel, scan, one device->host copy (its size), fill kernel.
  auto act_cnt = at::empty({R}, int_opts);
  launch_warps<L>(R, &rlif_active_count_kernel<acc_t>, v_trace.data_ptr<acc_t>(), T, B, n,
            a.threshold, static_cast<acc_t>(b_th), act_cnt.data_ptr<int32_t>());
  const at::Tensor act_off = offsets_of(act_cnt);
  const int64_t n_active = act_off[R].item<int64_t>();  // host sync: output size
  auto act_idx = at::empty({n_active}, int_opts);
  auto act_sg = at::empty({n_active}, x.options());
  launch_warps<L>(R, &active_fill_kernel<scalar_t, acc_t>, v_trace.data_ptr<acc_t>(), T, B, n,
            a.threshold, static_cast<acc_t>(b_th), a.slope, a.surrogate,
            act_off.data_ptr<int64_t>(), act_idx.data_ptr<int32_t>(), act_sg.data_ptr<scalar_t>());
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
    out = rlif_forward_impl<L, scalar_t>(x, weight, rec, contiguous(bias), contiguous(v_init),
                                         contiguous(s_init), alpha, threshold, b_th, slope, sparse,
                                         kinds);
  });
  return out;
}

// ------------------------------------------------------------------------------------------------
// The reverse walk and what both backwards compute from G the same way
// ------------------------------------------------------------------------------------------------
template <class L, typename scalar_t>
at::Tensor rlif_reverse_walk(const at::Tensor& gS, const c10::optional<at::Tensor>& gV,
                             const at::Tensor& rec, const RlifEntries<scalar_t>& entries,
                             double alpha, ResetKind reset) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = gS.size(0), B = gS.size(1), n = gS.size(2);
  at::Tensor G = at::empty({T, B, n}, acc_options(gS));  // every element is written below
  RlifBackStepArgs<scalar_t> a;
  a.T = T;
  a.B = B;
  a.n = n;
  a.alpha = static_cast<acc_t>(alpha);
  a.reset = reset;
  a.entries = entries;
  a.grad = gS.data_ptr<scalar_t>();
  a.g_init = ptr_or_null<scalar_t>(gV);
  a.rec = rec.data_ptr<scalar_t>();
  a.G = G.data_ptr<acc_t>();
  for (int64_t t = T - 1; t >= 0; --t) L::launch(B * n, &rlif_backward_step_kernel<scalar_t>, a, t);
  return G;
}

// db, dv_init, ds_init and the s_init part of dR (into drec, [N, N]) from G.
inline void rlif_state_grads(const at::Tensor& G, const at::Tensor& rec,
                             const c10::optional<at::Tensor>& s_init, double alpha, ResetKind reset,
                             const at::TensorOptions& opts, bool need_db, bool need_dv, bool need_ds,
                             at::Tensor* db, at::Tensor* dv, at::Tensor* ds, at::Tensor* drec) {
  const int64_t n = G.size(2);
  const at::Tensor G0 = G[0];
  if (need_db) *db = G.sum(at::IntArrayRef{0, 1}).to(opts.dtype());
  if (need_dv) {
    at::Tensor keep = G0 * alpha;
    if (reset == kResetZero && s_init.has_value()) keep = keep * (1 - s_init->to(G.scalar_type()));
    *dv = keep.to(opts.dtype()).contiguous();
  }
  if (need_ds) *ds = at::mm(G0, rec.to(G.scalar_type())).to(opts.dtype());
  if (drec && drec->defined() && s_init.has_value())
    drec->add_(at::mm(G0.t(), s_init->to(G.scalar_type())));
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
// rlif_backward_sparse
// ------------------------------------------------------------------------------------------------
template <class L, typename scalar_t>
RlifGrads rlif_backward_sparse_impl(const at::Tensor& gS, const c10::optional<at::Tensor>& gV,
                                    const at::Tensor& weight, const at::Tensor& rec,
                                    const c10::optional<at::Tensor>& s_init, const at::Tensor& act_cnt,
                                    const at::Tensor& act_idx, const at::Tensor& act_sg,
                                    const at::Tensor& ev_cnt, const at::Tensor& ev_idx,
                                    const at::Tensor& ev_val, const at::Tensor& bits,
                                    const c10::optional<at::Tensor>& prev_cnt,
                                    const c10::optional<at::Tensor>& prev_idx, double alpha,
                                    ResetKind reset, bool need_dx, bool need_dw, bool need_drec,
                                    bool need_db, bool need_dv, bool need_ds) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = gS.size(0), B = gS.size(1), n = weight.size(0), n_in = weight.size(1);
  const int64_t words = bit_words(n);
  const auto opts = gS.options();
  at::Tensor dx = at::empty({0}, opts), dw = dx.clone(), drec = dx.clone(), db = dx.clone(),
             dv = dx.clone(), ds = dx.clone();
  if (!(need_dx || need_dw || need_drec || need_db || need_dv || need_ds)) return {dx, dw, drec, db, dv, ds};

  // The compact tensors are checked on the device as the LIF ops' (prepare_csr, no host
  // synchronisation): the kernels then read only clamped offsets, in-range rows and columns,
  // and a raised flag poisons every gradient (NaN on the GPU, an error in the emulation).
  const char* op = "rlif_backward_sparse";
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
  const at::Tensor G = rlif_reverse_walk<L, scalar_t>(gS, gV, rec, entries, alpha, reset);

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
    L::launch(n * n, &rlif_drec_kernel<scalar_t>, bits.data_ptr<int32_t>(), (T - 1) * B, words, B, n,
              static_cast<const acc_t*>(G.data_ptr<acc_t>()), drec_t.data_ptr<acc_t>());
    drec = drec_t.t().contiguous();
  }
  rlif_state_grads(G, rec, s_init, alpha, reset, opts, need_db, need_dv, need_ds, &db, &dv, &ds,
                   need_drec ? &drec : nullptr);
  if (need_drec) drec = drec.to(opts.dtype());
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
    out = rlif_backward_sparse_impl<L, scalar_t>(
        grad_spikes.contiguous(), contiguous(grad_v_final), weight.contiguous(),
        rec_weight.contiguous(), contiguous(s_init), act_cnt.contiguous(), act_idx.contiguous(),
        act_sg.contiguous(), ev_cnt.contiguous(), ev_idx.contiguous(), ev_val.contiguous(),
        spk_bits.contiguous(), contiguous(prev_cnt), contiguous(prev_idx), alpha, reset, need_dx,
        need_dw, need_drec, need_db, need_dv, need_ds);
  });
  return out;
}

// ------------------------------------------------------------------------------------------------
// rlif_backward_dense: the same reverse walk over every entry, then GEMMs through ATen.
// ------------------------------------------------------------------------------------------------
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
  const int64_t T = grad_spikes.size(0), B = grad_spikes.size(1), n = weight_in.size(0),
                n_in = weight_in.size(1);
  const auto opts = grad_spikes.options();
  const at::Tensor gS = grad_spikes.contiguous(), rec = rec_in.contiguous(), spikes = spikes_in.contiguous(),
                   sg = sg_in.contiguous(), weight = weight_in.contiguous();
  const c10::optional<at::Tensor> gV = contiguous(grad_v_final), s_init = contiguous(s_init_in);
  at::Tensor dx = at::empty({0}, opts), dw = dx.clone(), drec = dx.clone(), db = dx.clone(),
             dv = dx.clone(), ds = dx.clone();
  AT_DISPATCH_FLOATING_TYPES(gS.scalar_type(), "sparsegrad_rlif_backward_dense_cuda", [&] {
    RlifEntries<scalar_t> entries;
    entries.sg = sg.data_ptr<scalar_t>();
    entries.spikes = spikes.data_ptr<scalar_t>();
    const at::Tensor G = rlif_reverse_walk<L, scalar_t>(gS, gV, rec, entries, alpha, reset);
    const auto acc = G.scalar_type();
    const at::Tensor G2 = G.view({T * B, n});
    if (need_dx) dx = rlif_full_dx(G, weight, opts);
    if (need_dw) dw = at::mm(G2.t(), x_in.contiguous().view({T * B, n_in}).to(acc)).to(opts.dtype());
    if (need_drec)  // dR = sum_t G[t+1]^T S[t]
      drec = at::mm(G.narrow(0, 1, T - 1).reshape({(T - 1) * B, n}).t(),
                    spikes.narrow(0, 0, T - 1).reshape({(T - 1) * B, n}).to(acc));
    rlif_state_grads(G, rec, s_init, alpha, reset, opts, need_db, need_dv, need_ds, &db, &dv, &ds,
                     need_drec ? &drec : nullptr);
    if (need_drec) drec = drec.to(opts.dtype());
  });
  return {dx, dw, drec, db, dv, ds};
}

}  // namespace host
}  // namespace cuda
}  // namespace sparsegrad
