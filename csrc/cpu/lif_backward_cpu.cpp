// LIF backward on the CPU: sparse (work on active entries and input events only) and dense
// (standard surrogate BPTT: reverse scan + two GEMMs).
#include <torch/library.h>

#include "low_precision.h"

#include "cpu/phase_profile.h"
#include "cpu/tiled_backward.h"
#include "cpu/trace_backward.h"

namespace sparsegrad {
namespace cpu {
namespace {

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Zero time steps: V_final = V_init, so dL/dV_init = dL/dV_final; nothing else receives gradient.
inline Grads no_steps_grads(const at::Tensor& gS, const c10::optional<at::Tensor>& gV,
                            const at::Tensor& weight, bool need_dx, bool need_dw, bool need_db, bool need_dv) {
  const auto opts = gS.options();
  const int64_t B = gS.size(1), n_out = weight.size(0), n_in = weight.size(1);
  at::Tensor dv = at::empty({0}, opts);
  if (need_dv) dv = gV.has_value() ? gV->contiguous().clone() : at::zeros({B, n_out}, opts);
  return {need_dx ? at::empty({0, B, n_in}, opts) : at::empty({0}, opts),
          need_dw ? at::zeros({n_out, n_in}, opts) : at::empty({0}, opts),
          need_db ? at::zeros({n_out}, opts) : at::empty({0}, opts), dv};
}

// W^T [N_in, N_out] padded with zeros to whole tiles, [N_in, width].
inline at::Tensor padded_weight_t(const at::Tensor& weight, int64_t width) {
  at::Tensor wt = at::zeros({weight.size(1), width}, weight.options());
  if (weight.numel() > 0) wt.narrow(1, 0, weight.size(0)).copy_(weight.t());
  return wt;
}

template <typename scalar_t>
Grads lif_backward_sparse_impl(const at::Tensor& gS, const c10::optional<at::Tensor>& gV,
                               const at::Tensor& weight, const at::Tensor& act_ptr,
                               const at::Tensor& act_idx, const at::Tensor& act_sg,
                               const at::Tensor& ev_ptr, const at::Tensor& ev_idx,
                               const at::Tensor& ev_val, const c10::optional<at::Tensor>& prev_ptr,
                               const c10::optional<at::Tensor>& prev_idx,
                               const c10::optional<at::Tensor>& rst_bits, double alpha, bool need_dx,
                               bool need_dw, bool need_db, bool need_dv, int64_t dw_route) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = gS.size(0), B = gS.size(1), n_out = weight.size(0), n_in = weight.size(1);
  const auto opts = gS.options();
  const auto acc_opts = opts.dtype(c10::CppTypeToScalarType<acc_t>::value);

  const int64_t* aptr = act_ptr.data_ptr<int64_t>();
  const int32_t* aidx = act_idx.data_ptr<int32_t>();
  const auto delta = active_deltas<scalar_t>(gS.data_ptr<scalar_t>(), aptr, aidx,
                                             act_sg.data_ptr<scalar_t>(), T, B, n_out);
  const acc_t* dl = delta.get();
  auto inject = [&](int64_t b, int64_t t, auto&& emit) {
    const int64_t r = b * T + t;
    for (int64_t e = aptr[r]; e < aptr[r + 1]; ++e) emit(int64_t(aidx[e]), dl[e]);
  };

  const bool dx_restricted =
      need_dx && prev_ptr.has_value() &&
      restrict_dx_to_producer(prev_idx->numel(), act_idx.numel(), T, B, n_in, n_out);
  // Reset to zero cuts the trace per neuron: only the events route handles that.
  const DwRoute route = rst_bits.has_value()
                            ? DwRoute::kEvents
                            : choose_dw_route(dw_route, ev_idx.numel(), act_idx.numel(), T, B, n_in, n_out);
  at::Tensor dw = need_dw ? at::empty({n_out, n_in}, opts) : at::empty({0}, opts);
  at::Tensor db = need_db ? at::empty({n_out}, opts) : at::empty({0}, opts);
  at::Tensor dv = need_dv ? at::empty({B, n_out}, opts) : at::empty({0}, opts);
  at::Tensor dx = at::empty({0}, opts);
  const bool dx_in_walk = dx_restricted && route == DwRoute::kEvents;
  if (need_dx) dx = dx_in_walk ? at::empty({T, B, n_in}, opts) : at::zeros({T, B, n_in}, opts);

  if (route == DwRoute::kEvents) {
    if (need_dw || need_db || need_dv || dx_in_walk) {
      TiledProblem<scalar_t> p;
      p.T = T; p.B = B; p.n_in = n_in; p.n_out = n_out;
      p.alpha = static_cast<acc_t>(alpha);
      p.g_init = gV.has_value() ? gV->data_ptr<scalar_t>() : nullptr;
      p.rst_bits = rst_bits.has_value() ? rst_bits->data_ptr<int32_t>() : nullptr;
      p.ev_off = ev_ptr.data_ptr<int64_t>();
      p.ev_idx = ev_idx.data_ptr<int32_t>();
      p.ev_val = ev_val.numel() > 0 ? ev_val.data_ptr<scalar_t>() : nullptr;
      at::Tensor weight_t;
      if (dx_in_walk) {
        p.width = Padded<acc_t>::width(n_out);
        weight_t = padded_weight_t(weight, p.width);
        p.weight_t = weight_t.data_ptr<scalar_t>();
        p.prev_off = prev_ptr->data_ptr<int64_t>();
        p.prev_idx = prev_idx->data_ptr<int32_t>();
        p.dx = dx.data_ptr<scalar_t>();
      }
      p.dw = need_dw ? dw.data_ptr<scalar_t>() : nullptr;
      p.db = need_db ? db.data_ptr<scalar_t>() : nullptr;
      p.dv = need_dv ? dv.data_ptr<scalar_t>() : nullptr;
      SparseInject<acc_t> injector;
      injector.rows = DeltaRows<acc_t>{aptr, aidx, dl};
      injector.T = T;
      tiled_backward<scalar_t>(p, injector);
    }
  }

  TraceProblem<scalar_t> p;
  p.T = T; p.B = B; p.n_in = n_in; p.n_out = n_out;
  p.alpha = static_cast<acc_t>(alpha);
  p.scale = acc_t(1);
  p.weight = weight.data_ptr<scalar_t>();
  p.g_init = gV.has_value() ? gV->data_ptr<scalar_t>() : nullptr;
  p.events = EventView<scalar_t>(ev_ptr, ev_idx, ev_val, T);
  if (rst_bits.has_value()) p.rst_bits = rst_bits->data_ptr<int32_t>();
  profile::Scope other_timer(profile::kBwdOther);
  if (route == DwRoute::kActive && (need_dw || need_db || need_dv)) {
    // dW, db, dv by the forward walk over active entries.
    const BatchChunks chunks(B);
    at::Tensor dw_parts, db_parts;
    if (need_dw) {
      dw_parts = at::zeros({chunks.count, n_out * n_in}, acc_opts);
      p.dw_parts = dw_parts.data_ptr<acc_t>();
    }
    if (need_db) {
      db_parts = at::zeros({chunks.count, n_out}, acc_opts);
      p.db_parts = db_parts.data_ptr<acc_t>();
    }
    p.dv = need_dv ? dv.data_ptr<scalar_t>() : nullptr;
    trace_forward_active<scalar_t>(p, inject);
    if (need_dw) dw = sum_chunks<scalar_t>(dw_parts, {n_out, n_in}, acc_t(1), opts);
    if (need_db) db = sum_chunks<scalar_t>(db_parts, {n_out}, acc_t(1), opts);
  }
  if (need_dx && !dx_in_walk) {  // dx by the reverse walk (everywhere, or on the producer's set)
    TraceProblem<scalar_t> dx_only = p;
    dx_only.dw_t_parts = dx_only.dw_parts = dx_only.db_parts = nullptr;
    dx_only.dv = nullptr;
    dx_only.dx = dx.data_ptr<scalar_t>();
    at::Tensor weight_t;
    if (dx_restricted) weight_t = restrict_dx(dx_only, weight, *prev_ptr, *prev_idx);
    trace_backward<scalar_t>(dx_only, inject);
  }
  return {dx, dw, db, dv};
}

Grads lif_backward_sparse_cpu(const at::Tensor& grad_spikes, const c10::optional<at::Tensor>& grad_v_final,
                              const at::Tensor& weight, const at::Tensor& act_cnt,
                              const at::Tensor& act_idx, const at::Tensor& act_sg,
                              const at::Tensor& ev_cnt, const at::Tensor& ev_idx,
                              const at::Tensor& ev_val, const c10::optional<at::Tensor>& prev_cnt,
                              const c10::optional<at::Tensor>& prev_idx,
                              const c10::optional<at::Tensor>& rst_bits, double alpha, bool need_dx,
                              bool need_dw, bool need_db, bool need_dv, int64_t dw_route) {
  const char* op = "lif_backward_sparse";
  check_lif_backward_sparse_args(grad_spikes, grad_v_final, weight, act_cnt, act_idx, act_sg, ev_cnt,
                                 ev_idx, ev_val, prev_cnt, prev_idx, rst_bits, alpha, dw_route);
  if (grad_spikes.size(0) == 0)
    return no_steps_grads(grad_spikes, grad_v_final, weight, need_dx, need_dw, need_db, need_dv);
  profile::Scope setup_timer(profile::kBwdSetup);
  const at::Tensor act_ptr = row_offsets(act_cnt, act_idx.numel(), weight.size(0), op, "act_cnt");
  const at::Tensor ev_ptr = row_offsets(ev_cnt, ev_idx.numel(), weight.size(1), op, "ev_cnt");
  c10::optional<at::Tensor> prev_ptr;
  if (prev_cnt.has_value()) prev_ptr = row_offsets(*prev_cnt, prev_idx->numel(), weight.size(1), op, "prev_cnt");
  check_index_range(act_idx.contiguous(), weight.size(0), op, "act_idx");
  check_index_range(ev_idx.contiguous(), weight.size(1), op, "ev_idx");
  if (prev_idx.has_value() && need_dx) check_index_range(prev_idx->contiguous(), weight.size(1), op, "prev_idx");
  const at::Tensor gS = grad_spikes.contiguous(), w = weight.contiguous();
  c10::optional<at::Tensor> gV;
  if (grad_v_final.has_value()) gV = grad_v_final->contiguous();
  auto cont = [](const c10::optional<at::Tensor>& t) -> c10::optional<at::Tensor> {
    return t.has_value() ? c10::optional<at::Tensor>(t->contiguous()) : c10::nullopt;
  };
  Grads out;
  setup_timer.stop();
  AT_DISPATCH_FLOATING_TYPES(gS.scalar_type(), "lif_backward_sparse_cpu", [&] {
    out = lif_backward_sparse_impl<scalar_t>(gS, gV, w, act_ptr, act_idx.contiguous(),
                                             act_sg.contiguous(), ev_ptr, ev_idx.contiguous(),
                                             ev_val.contiguous(), prev_ptr, cont(prev_idx),
                                             cont(rst_bits), alpha, need_dx, need_dw, need_db,
                                             need_dv, dw_route);
  });
  return out;
}

// Dense: G[t] = alpha*G[t+1] + dL/dS[t]*sg[t] for every entry, then dW = G^T x, dx = G W.
template <typename scalar_t>
at::Tensor reverse_scan(const at::Tensor& gS, const at::Tensor& sg, const c10::optional<at::Tensor>& gV,
                        const c10::optional<at::Tensor>& rst_bits, double alpha_d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = gS.size(0), B = gS.size(1), N = gS.size(2);
  const acc_t alpha = alpha_d;
  auto G = at::empty({T, B, N}, gS.options());
  const scalar_t* g = gS.data_ptr<scalar_t>();
  const scalar_t* s = sg.data_ptr<scalar_t>();
  const scalar_t* gv = gV.has_value() ? gV->data_ptr<scalar_t>() : nullptr;
  const int32_t* rst = rst_bits.has_value() ? rst_bits->data_ptr<int32_t>() : nullptr;
  const int64_t words = bit_words(N);
  scalar_t* out = G.data_ptr<scalar_t>();
  at::parallel_for(0, B, grain_for(T * N), [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> trace(N);
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t j = 0; j < N; ++j) trace[j] = gv ? static_cast<acc_t>(gv[b * N + j]) : acc_t(0);
      for (int64_t t = T - 1; t >= 0; --t) {
        const int64_t row = (t * B + b) * N;
        const acc_t a = t == T - 1 ? acc_t(1) : alpha;  // G[T-1] = dL/dV_final + delta[T-1]
        const int32_t* cut = (rst && t < T - 1) ? rst + ((t + 1) * B + b) * words : nullptr;
        for (int64_t j = 0; j < N; ++j) {
          const acc_t aj = cut ? math::trace_decay(a, test_bit(cut, j), int(kResetZero)) : a;
          trace[j] = math::decay_add(trace[j], static_cast<acc_t>(g[row + j]) * static_cast<acc_t>(s[row + j]), aj);
          out[row + j] = static_cast<scalar_t>(trace[j]);
        }
      }
    }
  });
  return G;
}

Grads lif_backward_dense_cpu(const at::Tensor& grad_spikes, const c10::optional<at::Tensor>& grad_v_final,
                             const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& sg_in,
                             const c10::optional<at::Tensor>& rst_bits_in, double alpha, bool need_dx,
                             bool need_dw, bool need_db, bool need_dv) {
  check_lif_backward_dense_args(grad_spikes, grad_v_final, x_in, weight_in, sg_in, rst_bits_in, alpha);
  if (grad_spikes.size(0) == 0)
    return no_steps_grads(grad_spikes, grad_v_final, weight_in, need_dx, need_dw, need_db, need_dv);
  c10::optional<at::Tensor> rst_bits;
  if (rst_bits_in.has_value()) rst_bits = rst_bits_in->contiguous();
  const int64_t T = grad_spikes.size(0), B = grad_spikes.size(1), n_in = weight_in.size(1),
                n_out = weight_in.size(0);
  const auto opts = grad_spikes.options();
  c10::optional<at::Tensor> gV;
  if (grad_v_final.has_value()) gV = grad_v_final->contiguous();
  at::Tensor G;
  AT_DISPATCH_FLOATING_TYPES(grad_spikes.scalar_type(), "lif_backward_dense_cpu", [&] {
    G = reverse_scan<scalar_t>(grad_spikes.contiguous(), sg_in.contiguous(), gV, rst_bits, alpha);
  });
  auto G2 = G.view({T * B, n_out});
  at::Tensor dx = need_dx ? at::mm(G2, weight_in.contiguous()).view({T, B, n_in}) : at::empty({0}, opts);
  at::Tensor dw = need_dw ? at::mm(G2.t(), x_in.contiguous().view({T * B, n_in})) : at::empty({0}, opts);
  at::Tensor db = need_db ? G2.sum(0) : at::empty({0}, opts);
  at::Tensor dv = need_dv ? initial_state_grad(G[0], rst_bits, alpha) : at::empty({0}, opts);
  return {dx, dw, db, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsegrad, CPU, m) {
  m.impl("lif_backward_sparse", SG_FLOAT32_MATH(lif_backward_sparse_cpu));
  m.impl("lif_backward_dense", SG_FLOAT32_MATH(lif_backward_dense_cpu));
}

}  // namespace cpu
}  // namespace sparsegrad
