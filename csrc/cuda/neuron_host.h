// Host side of the LIF neuron op on CUDA (lif_neuron_forward / lif_neuron_backward): checks,
// buffers, launches and scans, written once as templates over a Launcher (see host_ops.h) and
// compiled for the GPU (csrc/cuda/sparsegrad_cuda.cu) and for the host emulation
// (csrc/emul/emul_ops.cpp).
//
// Host synchronisation: only the sparse forward reads one number back (the size of the active
// set, to allocate act_idx / act_sg). The backward never synchronises.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/util/Optional.h>

#include <tuple>
#include <vector>

#include "op_checks.h"
#include "cuda/neuron.cuh"

namespace sparsegrad {
namespace cuda {
namespace host {

using NeuronForwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                        at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using NeuronGrads = std::tuple<at::Tensor, at::Tensor>;

namespace neuron_detail {

// int64 offsets [rows + 1] of a CSR given its int32 row counts (a device-wide scan on the GPU;
// checked on the host in the emulation).
inline at::Tensor offsets_from_counts(const at::Tensor& cnt, int64_t n_entries, int64_t n,
                                      const char* op) {
  return row_offsets(cnt, n_entries, n, op, "act_cnt");
}

// What the tensor-parameter op adds (all absent for the float op).
struct ParamExtras {
  const at::Tensor* alpha = nullptr;      // [N] per-neuron values, or null: the float argument
  const at::Tensor* threshold = nullptr;
  const at::Tensor* alpha_syn = nullptr;  // [N] or null: no synaptic current
  c10::optional<at::Tensor> syn_init;
  bool need[3] = {false, false, false};   // keep P, Q, U
  bool dense_traces = false;
};

struct ForwardResult {
  at::Tensor spikes, v_final, syn_final, act_cnt, act_idx, act_sg, act_rg, trace[3], tan_last,
      rst_bits, mem, stats;
};

template <typename acc_t>
ParamView<acc_t> param_view(const at::Tensor* t, double value) {
  return {static_cast<acc_t>(value), t ? t->data_ptr<acc_t>() : nullptr};
}

template <class L, typename scalar_t>
ForwardResult forward_impl(const at::Tensor& current, const c10::optional<at::Tensor>& v_init,
                           const c10::optional<at::Tensor>& s_init, double alpha,
                           double threshold, double b_th, double slope, bool sparse,
                           int surrogate, int reset, bool return_mem, int dynamics, double tau,
                           double v_reset, bool detach_reset, const ParamExtras& ex) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool keep_rg = dynamics != kChargeLeaky && !detach_reset;
  const int64_t T = current.size(0), B = current.size(1), N = current.size(2), R = B * T;
  const int64_t W = bit_words(N);
  const auto opts = current.options();
  const at::TensorOptions acc_opts = opts.dtype(c10::CppTypeToScalarType<acc_t>::value);
  const bool syn = ex.alpha_syn != nullptr;
  const bool track = ex.need[0] || ex.need[1] || ex.need[2];

  auto spikes = at::empty({T, B, N}, opts);
  auto v_final = at::empty({B, N}, opts);
  auto syn_final = syn ? at::empty({B, N}, opts) : at::empty({0}, opts);
  auto stats = at::zeros({3}, opts.dtype(at::kLong));
  auto mem = return_mem ? at::empty({T, B, N}, opts) : at::empty({0}, opts);
  auto sg_dense = sparse ? at::empty({0}, opts) : at::empty({T, B, N}, opts);
  auto rg_dense = keep_rg && !sparse ? at::empty({T, B, N}, opts) : at::empty({0}, opts);
  at::Tensor v_trace = sparse ? at::empty({T, B, N}, acc_opts) : at::empty({0}, acc_opts);
  // the traces at every entry: the outputs themselves (dense_traces) or scratch for the gather
  at::Tensor trace_all[3];
  for (int q = 0; q < 3; ++q) trace_all[q] = at::empty({ex.need[q] ? T * B * N : 0}, opts);
  auto tan_last = track ? at::empty({4, B, N}, opts) : at::empty({0}, opts);

  NeuronForwardArgs<scalar_t> a;
  a.current = current.data_ptr<scalar_t>();
  a.T = T;
  a.B = B;
  a.N = N;
  a.alpha = param_view<acc_t>(ex.alpha, alpha);
  a.threshold = param_view<acc_t>(ex.threshold, threshold);
  a.slope = static_cast<acc_t>(slope);
  a.syn = syn;
  a.alpha_syn = param_view<acc_t>(ex.alpha_syn, 0.0);
  a.syn_init = ptr_or_null<scalar_t>(ex.syn_init);
  a.syn_final = syn ? syn_final.data_ptr<scalar_t>() : nullptr;
  a.track = track;
  for (int q = 0; q < 3; ++q) a.trace[q] = ex.need[q] ? trace_all[q].data_ptr<scalar_t>() : nullptr;
  a.tan_last = track ? tan_last.data_ptr<scalar_t>() : nullptr;
  a.surrogate = surrogate;
  a.reset = reset;
  a.dynamics = dynamics;
  a.tau = static_cast<acc_t>(tau);
  a.v_reset = static_cast<acc_t>(v_reset);
  a.v_init = ptr_or_null<scalar_t>(v_init);
  a.s_init = ptr_or_null<scalar_t>(s_init);
  a.spikes = spikes.data_ptr<scalar_t>();
  a.v_final = v_final.data_ptr<scalar_t>();
  a.mem = return_mem ? mem.data_ptr<scalar_t>() : nullptr;
  a.v_trace = sparse ? v_trace.data_ptr<acc_t>() : nullptr;
  a.sg_dense = sparse ? nullptr : sg_dense.data_ptr<scalar_t>();
  a.rg_dense = keep_rg && !sparse ? rg_dense.data_ptr<scalar_t>() : nullptr;
  a.counts = stats.data_ptr<int64_t>();
  L::launch(B * N, &neuron_forward_kernel<scalar_t>, a);

  auto rst_bits = at::empty({0}, opts.dtype(at::kInt));
  if (reset == kResetZero) {
    rst_bits = at::empty({T, B, W}, opts.dtype(at::kInt));
    L::launch(T * B * W, &neuron_pack_bits_kernel<scalar_t>, a.spikes, a.s_init, T, B, N, W,
              dynamics != kChargeLeaky, rst_bits.data_ptr<int32_t>());
  }

  ForwardResult r;
  r.spikes = spikes;
  r.v_final = v_final;
  r.syn_final = syn_final;
  r.tan_last = tan_last;
  r.rst_bits = rst_bits;
  r.mem = mem;
  r.stats = stats;
  const auto int_opts = opts.dtype(at::kInt);
  if (!sparse) {
    stats.narrow(0, 1, 1).fill_(T * B * N);
    r.act_cnt = at::empty({0}, int_opts);
    r.act_idx = at::empty({0}, int_opts);
    r.act_sg = sg_dense;
    r.act_rg = rg_dense;
    for (int q = 0; q < 3; ++q) r.trace[q] = trace_all[q];
    return r;
  }
  auto act_cnt = at::empty({R}, int_opts);
  L::launch(R, &neuron_active_count_kernel<acc_t>, a.v_trace, T, B, N, a.threshold,
            static_cast<acc_t>(b_th), act_cnt.data_ptr<int32_t>());
  auto offsets = at::zeros({R + 1}, act_cnt.options().dtype(at::kLong));
  if (R > 0) offsets.narrow(0, 1, R).copy_(at::cumsum(act_cnt, 0, at::kLong));
  const int64_t n_active = offsets.narrow(0, R, 1).cpu().data_ptr<int64_t>()[0];  // host sync
  auto act_idx = at::empty({n_active}, int_opts);
  auto act_sg = at::empty({n_active}, opts);
  auto act_rg = at::empty({keep_rg ? n_active : 0}, opts);
  TraceCopy<scalar_t> gather;
  for (int q = 0; q < 3; ++q) {
    if (ex.dense_traces || !ex.need[q]) {
      r.trace[q] = trace_all[q];
    } else {
      r.trace[q] = at::empty({n_active}, opts);
      gather.src[q] = trace_all[q].data_ptr<scalar_t>();
      gather.dst[q] = r.trace[q].data_ptr<scalar_t>();
    }
  }
  L::launch(R, &neuron_active_fill_kernel<scalar_t, acc_t>, a.v_trace, T, B, N, a.threshold,
            static_cast<acc_t>(b_th), a.slope, surrogate, offsets.data_ptr<int64_t>(),
            act_idx.data_ptr<int32_t>(), act_sg.data_ptr<scalar_t>(),
            keep_rg ? act_rg.data_ptr<scalar_t>() : static_cast<scalar_t*>(nullptr), a.v_reset,
            reset, gather);
  stats.narrow(0, 1, 1).fill_(n_active);
  r.act_cnt = act_cnt;
  r.act_idx = act_idx;
  r.act_sg = act_sg;
  r.act_rg = act_rg;
  return r;
}

// What the tensor-parameter backward adds (all absent for the float op).
struct ParamGradExtras {
  const at::Tensor* alpha = nullptr;      // [N] or null: the float argument
  const at::Tensor* alpha_syn = nullptr;  // [N] or null
  c10::optional<at::Tensor> grad_syn_final;
  bool need_dsyn = false;
  const at::Tensor* trace[3] = {nullptr, nullptr, nullptr};  // P, Q, U (compact or [T, B, N])
  const at::Tensor* tan_last = nullptr;
  bool dense_traces = false;
  bool need[3] = {false, false, false};   // d_alpha, d_threshold, d_alpha_syn
};

template <class L, typename scalar_t>
std::vector<at::Tensor> backward_impl(const at::Tensor& grad_spikes,
                                      const c10::optional<at::Tensor>& grad_v_final,
                                      const c10::optional<at::Tensor>& grad_mem,
                                      const at::Tensor& act_cnt, const at::Tensor& act_idx,
                                      const at::Tensor& act_sg,
                                      const c10::optional<at::Tensor>& act_rg,
                                      const c10::optional<at::Tensor>& rst_bits, double alpha,
                                      bool sparse, bool need_dv, bool leaky, double input_scale,
                                      const ParamGradExtras& ex) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = grad_spikes.size(0), B = grad_spikes.size(1), N = grad_spikes.size(2);
  const int64_t R = B * T;
  const auto opts = grad_spikes.options();
  const bool track = ex.need[0] || ex.need[1] || ex.need[2];
  auto grad_current = sparse ? at::zeros({T, B, N}, opts) : at::empty({T, B, N}, opts);
  auto dv = need_dv ? at::empty({B, N}, opts) : at::empty({0}, opts);
  auto dsyn = ex.need_dsyn ? at::empty({B, N}, opts) : at::empty({0}, opts);
  at::Tensor dparam[3];
  for (int q = 0; q < 3; ++q) dparam[q] = ex.need[q] ? at::empty({B, N}, opts) : at::empty({0}, opts);
  // The reset terms as a dense [T, B, N] (scattered from the active entries in sparse mode).
  at::Tensor rg = act_rg.has_value() ? (sparse ? at::zeros({T, B, N}, opts) : *act_rg)
                                     : at::empty({0}, opts);
  // The traces as [T, B, N] (scattered from the active entries when they are kept compactly).
  at::Tensor trace[3];
  TraceCopy<scalar_t> scatter;
  for (int q = 0; q < 3; ++q) {
    const bool have = track && ex.trace[q] != nullptr && ex.trace[q]->numel() > 0;
    if (!have) continue;
    if (ex.dense_traces) {
      trace[q] = ex.trace[q]->contiguous();
    } else {
      trace[q] = at::zeros({T, B, N}, opts);
      scatter.src[q] = ex.trace[q]->data_ptr<scalar_t>();
      scatter.dst[q] = trace[q].data_ptr<scalar_t>();
    }
  }
  if (sparse) {
    auto offsets = offsets_from_counts(act_cnt, act_idx.numel(), N, "lif_neuron_backward");
    L::launch(R, &neuron_scatter_delta_kernel<scalar_t>, grad_spikes.data_ptr<scalar_t>(),
              offsets.data_ptr<int64_t>(), act_idx.data_ptr<int32_t>(),
              act_sg.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(act_rg), T, B, N,
              grad_current.data_ptr<scalar_t>(),
              act_rg.has_value() ? rg.data_ptr<scalar_t>() : static_cast<scalar_t*>(nullptr),
              scatter);
  }
  NeuronTraceArgs<scalar_t> a;
  a.T = T;
  a.B = B;
  a.N = N;
  a.W = bit_words(N);
  a.alpha = param_view<acc_t>(ex.alpha, alpha);
  a.syn = ex.alpha_syn != nullptr;
  a.alpha_syn = param_view<acc_t>(ex.alpha_syn, 0.0);
  a.grad_syn_final = ptr_or_null<scalar_t>(ex.grad_syn_final);
  a.dsyn_init = ex.need_dsyn ? dsyn.data_ptr<scalar_t>() : nullptr;
  a.track = track;
  for (int q = 0; q < 3; ++q) {
    a.trace[q] = trace[q].defined() ? trace[q].data_ptr<scalar_t>() : nullptr;
    a.dparam[q] = ex.need[q] ? dparam[q].data_ptr<scalar_t>() : nullptr;
  }
  a.tan_last = track ? ex.tan_last->data_ptr<scalar_t>() : nullptr;
  a.reset = rst_bits.has_value() ? kResetZero : kResetSubtract;
  a.leaky = leaky;
  a.input_scale = static_cast<acc_t>(input_scale);
  a.rg = act_rg.has_value() ? rg.data_ptr<scalar_t>() : nullptr;
  a.grad_v_final = ptr_or_null<scalar_t>(grad_v_final);
  a.grad_mem = ptr_or_null<scalar_t>(grad_mem);
  a.bits = rst_bits.has_value() ? rst_bits->data_ptr<int32_t>() : nullptr;
  a.grad_spikes = grad_spikes.data_ptr<scalar_t>();
  a.sg_dense = sparse ? nullptr : act_sg.data_ptr<scalar_t>();
  a.grad_current = grad_current.data_ptr<scalar_t>();
  a.dv_init = need_dv ? dv.data_ptr<scalar_t>() : nullptr;
  L::launch(B * N, &neuron_trace_kernel<scalar_t>, a);
  return {grad_current, dv, dsyn, dparam[0], dparam[1], dparam[2]};
}

}  // namespace neuron_detail

template <class L>
NeuronForwardOutputs lif_neuron_forward(const at::Tensor& current_in,
                                        const c10::optional<at::Tensor>& v_init,
                                        const c10::optional<at::Tensor>& s_init, double alpha,
                                        double threshold, double b_th, double slope, bool sparse,
                                        c10::string_view surrogate, c10::string_view reset,
                                        bool return_mem, c10::string_view dynamics, double tau,
                                        double v_reset, bool detach_reset) {
  const NeuronOpKinds kinds = check_lif_neuron_forward_args(current_in, v_init, s_init, alpha,
                                                          threshold, b_th, slope, surrogate, reset,
                                                          return_mem, dynamics, tau);
  const at::Tensor current = current_in.contiguous();
  NeuronForwardOutputs out;
  AT_DISPATCH_FLOATING_TYPES(current.scalar_type(), "lif_neuron_forward_cuda", [&] {
    const auto r = neuron_detail::forward_impl<L, scalar_t>(
        current, contiguous(v_init), contiguous(s_init),
        alpha, threshold, b_th, slope, sparse, kinds.surrogate, kinds.reset, return_mem,
        kinds.dynamics, tau, v_reset, detach_reset, neuron_detail::ParamExtras{});
    out = {r.spikes, r.v_final, r.act_cnt, r.act_idx, r.act_sg, r.act_rg, r.rst_bits, r.mem,
           r.stats};
  });
  return out;
}

template <class L>
NeuronGrads lif_neuron_backward(const at::Tensor& grad_spikes_in,
                                const c10::optional<at::Tensor>& grad_v_final,
                                const c10::optional<at::Tensor>& grad_mem,
                                const at::Tensor& act_cnt, const at::Tensor& act_idx,
                                const at::Tensor& act_sg, const c10::optional<at::Tensor>& act_rg,
                                const c10::optional<at::Tensor>& rst_bits, double alpha,
                                bool sparse, bool need_dv, c10::string_view dynamics,
                                double input_scale) {
  const bool has_rst = check_lif_neuron_backward_args(grad_spikes_in, grad_v_final, grad_mem,
                                                      act_cnt, act_idx, act_sg, act_rg, rst_bits,
                                                      alpha, sparse, dynamics);
  const bool leaky = parse_dynamics(dynamics, "lif_neuron_backward") == kChargeLeaky;
  const bool has_rg = !leaky && act_rg.has_value() && act_rg->numel() > 0;
  const at::Tensor grad_spikes = grad_spikes_in.contiguous();
  NeuronGrads out;
  AT_DISPATCH_FLOATING_TYPES(grad_spikes.scalar_type(), "lif_neuron_backward_cuda", [&] {
    const auto g = neuron_detail::backward_impl<L, scalar_t>(
        grad_spikes, contiguous(grad_v_final),
        contiguous(grad_mem), act_cnt.contiguous(), act_idx.contiguous(),
        act_sg.contiguous(), has_rg ? contiguous(act_rg) : c10::nullopt,
        has_rst ? contiguous(rst_bits) : c10::nullopt, alpha, sparse, need_dv,
        leaky, input_scale, neuron_detail::ParamGradExtras{});
    out = {g[0], g[1]};
  });
  return out;
}

using ParamNeuronOutputs =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
               at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using ParamNeuronGrads =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The tensor-parameter neuron op (per-neuron, learnable alpha / threshold, synaptic current).
template <class L>
ParamNeuronOutputs lif_neuron_param_forward(
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
  const at::Tensor alpha = alpha_in.contiguous(), threshold = threshold_in.contiguous();
  const auto alpha_syn = contiguous(alpha_syn_in);
  neuron_detail::ParamExtras ex;
  ex.alpha = &alpha;
  ex.threshold = &threshold;
  ex.alpha_syn = alpha_syn.has_value() ? &*alpha_syn : nullptr;
  ex.syn_init = contiguous(syn_init);
  ex.need[0] = need_dalpha;
  ex.need[1] = need_dthreshold && kinds.reset == kResetSubtract;  // Q = 0 for the other resets
  ex.need[2] = need_dalpha_syn && alpha_syn.has_value();
  ex.dense_traces = !sparse || return_mem;
  const bool any = need_dalpha || need_dthreshold || ex.need[2];
  ParamNeuronOutputs out;
  AT_DISPATCH_FLOATING_TYPES(current.scalar_type(), "lif_neuron_param_forward_cuda", [&] {
    auto r = neuron_detail::forward_impl<L, scalar_t>(
        current, contiguous(v_init), contiguous(s_init), 0.0, 1.0, b_th, slope, sparse,
        kinds.surrogate, kinds.reset, return_mem, kChargeLeaky, 2.0, 0.0, true, ex);
    if (any && !r.tan_last.numel())  // threshold only, reset without Q: the last traces are zero
      r.tan_last = at::zeros({4, current.size(1), current.size(2)}, current.options());
    out = {r.spikes, r.v_final, r.syn_final, r.act_cnt, r.act_idx, r.act_sg, r.trace[0],
           r.trace[1], r.trace[2], r.tan_last, r.rst_bits, r.mem, r.stats};
  });
  return out;
}

template <class L>
ParamNeuronGrads lif_neuron_param_backward(
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
  const at::Tensor alpha = alpha_in.contiguous();
  const auto alpha_syn = contiguous(alpha_syn_in);
  const at::Tensor tr[3] = {act_p.contiguous(), act_q.contiguous(), act_u.contiguous()};
  const at::Tensor tl = tan_last.contiguous();
  neuron_detail::ParamGradExtras ex;
  ex.alpha = &alpha;
  ex.alpha_syn = alpha_syn.has_value() ? &*alpha_syn : nullptr;
  ex.grad_syn_final = contiguous(grad_syn_final);
  ex.need_dsyn = need_dsyn;
  for (int q = 0; q < 3; ++q) ex.trace[q] = &tr[q];
  ex.tan_last = &tl;
  ex.dense_traces = dense_traces;
  ex.need[0] = need_dalpha;
  ex.need[1] = need_dthreshold;
  ex.need[2] = need_dalpha_syn;
  ParamNeuronGrads out;
  AT_DISPATCH_FLOATING_TYPES(grad_spikes.scalar_type(), "lif_neuron_param_backward_cuda", [&] {
    const auto g = neuron_detail::backward_impl<L, scalar_t>(
        grad_spikes, contiguous(grad_v_final), contiguous(grad_mem), act_cnt.contiguous(),
        act_idx.contiguous(), act_sg.contiguous(), c10::nullopt,
        has_rst ? contiguous(rst_bits) : c10::nullopt, 0.0, sparse, need_dv, true, 1.0, ex);
    out = {g[0], g[1], g[2], g[3], g[4], g[5]};
  });
  return out;
}

}  // namespace host
}  // namespace cuda
}  // namespace sparsegrad
