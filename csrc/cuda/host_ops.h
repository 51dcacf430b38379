// Host side of the CUDA ops: argument checks, buffers, the sequence of kernel launches and ATen
// calls (GEMMs, scans). Written once as templates over a Launcher and compiled twice:
//   - csrc/cuda/sparsegrad_cuda.cu: Launcher = CudaLauncher (kernel<<<grid, block, 0, stream>>>
//     on the current stream, C10_CUDA_KERNEL_LAUNCH_CHECK after each launch), CUDA tensors;
//   - csrc/emul/emul_ops.cpp: Launcher = the host emulation (csrc/cuda/emulation.h), CPU tensors.
// So the emulated ops run the same kernel bodies, in the same order, with the same scans and
// GEMMs in between, as the GPU ops.
//
// Launcher requirements: static void launch(int64_t n, void (*kernel)(KArgs...), Args... args)
// runs `kernel` with enough threads for a grid-stride loop over n items (nothing when n == 0);
// static constexpr bool kTileChoice: whether wide_tiles() may ask for kWideTile-wide tiles in the
// backward walks (see backward.cuh); false on the GPU, so only one width is compiled there.
//
// Host synchronisation (device -> host copies) happens only where a size must be known on the
// host to allocate an output: the number of input events (plus whether x is binary) in every
// forward, and the number of active entries in a sparse LIF forward. The backward ops never
// synchronise.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/util/Optional.h>

#include <string>
#include <tuple>
#include <type_traits>

#include "cpu/trace_backward.h"  // Events, kEventDensityMax, choose_dw_route
#include "op_checks.h"
#include "cuda/backward.cuh"
#include "cuda/compaction.cuh"
#include "cuda/forward.cuh"

namespace sparsegrad {
namespace cuda {
namespace host {

using ForwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                  at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using LifGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using ReadoutForwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using ReadoutGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

using cpu::Events;

inline c10::optional<at::Tensor> contiguous(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? c10::optional<at::Tensor>(t->contiguous()) : c10::nullopt;
}

template <typename T>
inline const T* ptr_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

inline at::TensorOptions acc_options(const at::Tensor& like) {
  const auto acc = like.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return like.options().dtype(acc);
}

// ------------------------------------------------------------------------------------------------
// Input events: count kernel, scan, one device->host copy (nnz and the binary flag), fill kernel.
// ------------------------------------------------------------------------------------------------
template <class L, typename scalar_t>
Events build_events(const at::Tensor& x) {
  const int64_t T = x.size(0), B = x.size(1), N = x.size(2), R = B * T;
  const auto long_opts = x.options().dtype(at::kLong);
  Events ev;
  ev.ptr = at::zeros({R + 1}, long_opts);
  auto nonbinary = at::zeros({1}, long_opts);
  L::launch(R, &events_count_kernel<scalar_t>, x.data_ptr<scalar_t>(), T, B, N,
            ev.ptr.data_ptr<int64_t>(), nonbinary.data_ptr<int64_t>());
  ev.cnt = ev.ptr.narrow(0, 1, R).to(at::kInt);  // the op's output: per-row counts
  ev.ptr.cumsum_(0);
  const auto sizes = at::cat({ev.ptr.narrow(0, R, 1), nonbinary}).cpu();  // host sync: output size
  ev.nnz = sizes.data_ptr<int64_t>()[0];
  ev.binary = sizes.data_ptr<int64_t>()[1] == 0;
  ev.idx = at::empty({ev.nnz}, x.options().dtype(at::kInt));
  ev.val = at::empty({ev.binary ? 0 : ev.nnz}, x.options());
  L::launch(R, &events_fill_kernel<scalar_t>, x.data_ptr<scalar_t>(), T, B, N,
            ev.ptr.data_ptr<int64_t>(), ev.idx.data_ptr<int32_t>(),
            ev.binary ? static_cast<scalar_t*>(nullptr) : ev.val.data_ptr<scalar_t>());
  return ev;
}

template <typename scalar_t>
CsrView<scalar_t> csr_view(const at::Tensor& ptr, const at::Tensor& idx, const at::Tensor& val) {
  CsrView<scalar_t> v;
  v.ptr = ptr.data_ptr<int64_t>();
  v.idx = idx.data_ptr<int32_t>();
  v.val = val.numel() > 0 ? val.data_ptr<scalar_t>() : nullptr;
  return v;
}

// The input current, as the CPU chooses it: from the events below kEventDensityMax input
// density, else from one GEMM (cuBLAS on the GPU) into a [T, B, N_out] buffer.
template <typename scalar_t>
struct CurrentPlan {
  at::Tensor weight_t, dense;
  InputCurrent<scalar_t> current;

  CurrentPlan(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
              const Events& ev) {
    const int64_t T = x.size(0), B = x.size(1), n_in = x.size(2), n_out = weight.size(0);
    const double density = x.numel() > 0 ? double(ev.nnz) / double(x.numel()) : 0.0;
    current.T = T;
    current.B = B;
    current.n_out = n_out;
    if (density <= cpu::kEventDensityMax) {
      weight_t = weight.t().contiguous();
      current.events = csr_view<scalar_t>(ev.ptr, ev.idx, ev.val);
      current.weight_t = weight_t.data_ptr<scalar_t>();
      current.bias = ptr_or_null<scalar_t>(bias);
    } else {
      auto x2 = x.reshape({T * B, n_in});
      dense = bias.has_value() ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
      current.dense = dense.data_ptr<scalar_t>();
    }
  }
};

// ------------------------------------------------------------------------------------------------
// lif_forward
// ------------------------------------------------------------------------------------------------
template <class L, typename scalar_t>
ForwardOutputs lif_forward_impl(const at::Tensor& x, const at::Tensor& weight,
                                const c10::optional<at::Tensor>& bias,
                                const c10::optional<at::Tensor>& v_init,
                                const c10::optional<at::Tensor>& s_init, double alpha,
                                double threshold, double b_th, double slope, bool sparse,
                                NeuronKinds kinds) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = x.size(0), B = x.size(1), n_out = weight.size(0), R = B * T;
  const auto long_opts = x.options().dtype(at::kLong);
  const Events ev = build_events<L, scalar_t>(x);
  CurrentPlan<scalar_t> plan(x, weight, bias, ev);

  auto spikes = at::empty({T, B, n_out}, x.options());
  auto v_final = at::empty({B, n_out}, x.options());
  auto stats = at::zeros({3}, long_opts);
  at::Tensor v_trace, sg_dense = sparse ? at::empty({0}, x.options()) : at::empty({T, B, n_out}, x.options());

  LifForwardArgs<scalar_t> a;
  a.current = plan.current;
  a.T = T;
  a.B = B;
  a.n_out = n_out;
  a.alpha = static_cast<acc_t>(alpha);
  a.threshold = static_cast<acc_t>(threshold);
  a.slope = static_cast<acc_t>(slope);
  a.surrogate = kinds.surrogate;
  a.reset = kinds.reset;
  a.v_init = ptr_or_null<scalar_t>(v_init);
  a.s_init = ptr_or_null<scalar_t>(s_init);
  a.spikes = spikes.data_ptr<scalar_t>();
  a.v_final = v_final.data_ptr<scalar_t>();
  a.spike_count = stats.data_ptr<int64_t>();
  if (sparse) {
    if constexpr (std::is_same_v<acc_t, scalar_t>) {
      v_trace = plan.dense.defined() ? plan.dense : at::empty({T, B, n_out}, acc_options(x));
    } else {
      v_trace = at::empty({T, B, n_out}, acc_options(x));
    }
    a.v_trace = v_trace.data_ptr<acc_t>();  // reuses the GEMM buffer when there is one
  } else {
    a.sg_dense = sg_dense.data_ptr<scalar_t>();
  }
  L::launch(B * n_out, &lif_forward_kernel<scalar_t>, a);
  stats.narrow(0, 2, 1).fill_(ev.nnz);
  // Reset to zero: the spikes that reset V, bit-packed for the backward (op_schemas.h).
  const int64_t words = bit_words(n_out);
  const bool zero_reset = kinds.reset == kResetZero;
  at::Tensor rst_bits = zero_reset ? at::empty({T, B, words}, x.options().dtype(at::kInt))
                                   : at::empty({0}, x.options().dtype(at::kInt));
  if (zero_reset)
    L::launch(T * B * words, &reset_bits_kernel<scalar_t>, a.spikes, a.s_init, T, B, n_out,
              rst_bits.data_ptr<int32_t>());

  if (!sparse) {
    stats.narrow(0, 1, 1).fill_(T * B * n_out);
    auto empty_int = [&] { return at::empty({0}, x.options().dtype(at::kInt)); };
    return {spikes, v_final, empty_int(), empty_int(), sg_dense, empty_int(), empty_int(),
            at::empty({0}, x.options()), rst_bits, stats};
  }

  // Compact the active set: count kernel, scan, one device->host copy (its size), fill kernel.
  auto act_ptr = at::zeros({R + 1}, long_opts);
  L::launch(R, &active_count_kernel<acc_t>, v_trace.data_ptr<acc_t>(), T, B, n_out,
            static_cast<acc_t>(threshold), static_cast<acc_t>(b_th), act_ptr.data_ptr<int64_t>());
  const at::Tensor act_cnt = act_ptr.narrow(0, 1, R).to(at::kInt);
  act_ptr.cumsum_(0);
  const int64_t n_active = act_ptr[R].item<int64_t>();  // host sync: output size
  auto act_idx = at::empty({n_active}, x.options().dtype(at::kInt));
  auto act_sg = at::empty({n_active}, x.options());
  L::launch(R, &active_fill_kernel<scalar_t, acc_t>, v_trace.data_ptr<acc_t>(), T, B, n_out,
            static_cast<acc_t>(threshold), static_cast<acc_t>(b_th), static_cast<acc_t>(slope),
            int(kinds.surrogate), act_ptr.data_ptr<int64_t>(), act_idx.data_ptr<int32_t>(),
            act_sg.data_ptr<scalar_t>());
  stats.narrow(0, 1, 1).fill_(n_active);
  return {spikes, v_final, act_cnt, act_idx, act_sg, ev.cnt, ev.idx, ev.val, rst_bits, stats};
}

template <class L>
ForwardOutputs lif_forward(const at::Tensor& x_in, const at::Tensor& weight_in,
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
  ForwardOutputs out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparsegrad_lif_forward_cuda", [&] {
    out = lif_forward_impl<L, scalar_t>(x, weight, contiguous(bias_in), contiguous(v_init_in),
                                        contiguous(s_init_in), alpha, threshold, b_th, slope, sparse,
                                        kinds);
  });
  return out;
}

// ------------------------------------------------------------------------------------------------
// lif_backward_sparse
// ------------------------------------------------------------------------------------------------
constexpr int kWideTile = 4;

inline int64_t tiles(int64_t n, int64_t tile) { return (n + tile - 1) / tile; }

// The GPU runs one output (input) neuron per thread; the emulation can also run kWideTile-wide
// tiles (L::kTileChoice, chosen by the tests), keeping the tiled code path correct for tuning.
template <class L, typename scalar_t, typename Inject>
void launch_trace_backward(const TraceArgs<scalar_t>& p, const Inject& inject) {
  if constexpr (L::kTileChoice) {
    if (L::wide_tiles()) {
      L::launch(p.B * tiles(p.n_out, kWideTile), &trace_backward_kernel<scalar_t, kWideTile, Inject>, p, inject);
      return;
    }
  }
  L::launch(p.B * p.n_out, &trace_backward_kernel<scalar_t, 1, Inject>, p, inject);
}

template <class L, typename scalar_t>
void launch_dw_active(const DwActiveArgs<scalar_t>& q) {
  if constexpr (L::kTileChoice) {
    if (L::wide_tiles()) {
      L::launch(q.B * tiles(q.n_in, kWideTile), &dw_active_kernel<scalar_t, kWideTile>, q);
      return;
    }
  }
  L::launch(q.B * q.n_in, &dw_active_kernel<scalar_t, 1>, q);
}

template <class L, typename scalar_t>
LifGrads lif_backward_sparse_impl(const at::Tensor& gS, const c10::optional<at::Tensor>& gV,
                                  const at::Tensor& weight, const at::Tensor& act_ptr,
                                  const at::Tensor& act_idx, const at::Tensor& act_sg,
                                  const at::Tensor& ev_ptr, const at::Tensor& ev_idx,
                                  const at::Tensor& ev_val, const c10::optional<at::Tensor>& prev_ptr,
                                  const c10::optional<at::Tensor>& prev_idx,
                                  const c10::optional<at::Tensor>& rst_bits, double alpha,
                                  bool need_dx, bool need_dw, bool need_db, bool need_dv,
                                  int64_t dw_route) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = gS.size(0), B = gS.size(1), n_out = weight.size(0), n_in = weight.size(1);
  const auto opts = gS.options();
  const auto acc_opts = acc_options(gS);
  const auto route = cpu::choose_dw_route(dw_route, ev_idx.numel(), act_idx.numel(), T, B, n_in, n_out);
  // Reset to zero cuts the trace per neuron: only the events route handles that.
  const bool dw_events = need_dw && (route == cpu::DwRoute::kEvents || rst_bits.has_value());
  const bool full_dx = need_dx && !prev_ptr.has_value();

  TraceArgs<scalar_t> p;
  p.T = T;
  p.B = B;
  p.n_in = n_in;
  p.n_out = n_out;
  p.alpha = static_cast<acc_t>(alpha);
  p.scale = acc_t(1);
  p.g_init = ptr_or_null<scalar_t>(gV);
  p.events = csr_view<scalar_t>(ev_ptr, ev_idx, ev_val);
  p.rst_bits = ptr_or_null<int32_t>(rst_bits);
  at::Tensor weight_t, dx_acc, g_dense, dw_acc, db_acc, dv = at::empty({0}, opts);
  if (need_dx && !full_dx) {
    weight_t = weight.t().contiguous();
    dx_acc = at::zeros({T, B, n_in}, acc_opts);
    p.weight_t = weight_t.data_ptr<scalar_t>();
    p.prev_ptr = prev_ptr->data_ptr<int64_t>();
    p.prev_idx = prev_idx->data_ptr<int32_t>();
    p.dx = dx_acc.data_ptr<acc_t>();
  }
  if (full_dx) {
    g_dense = at::zeros({T, B, n_out}, acc_opts);
    p.g_dense = g_dense.data_ptr<acc_t>();
  }
  if (need_dv) {
    dv = at::empty({B, n_out}, opts);
    p.dv = dv.data_ptr<scalar_t>();
  }
  if (need_db) {
    db_acc = at::zeros({n_out}, acc_opts);
    p.db = db_acc.data_ptr<acc_t>();
  }
  if (dw_events) {
    dw_acc = at::zeros({n_in, n_out}, acc_opts);
    p.dw_t = dw_acc.data_ptr<acc_t>();
  }
  LifInject<scalar_t> inject;
  inject.act = csr_view<scalar_t>(act_ptr, act_idx, act_sg);
  inject.grad = gS.data_ptr<scalar_t>();
  inject.T = T;
  inject.B = B;
  inject.n_out = n_out;
  if (need_dx || need_db || need_dv || dw_events)
    launch_trace_backward<L>(p, inject);

  if (need_dw && !dw_events) {
    dw_acc = at::zeros({n_out, n_in}, acc_opts);
    DwActiveArgs<scalar_t> q;
    q.T = T;
    q.B = B;
    q.n_in = n_in;
    q.n_out = n_out;
    q.alpha = static_cast<acc_t>(alpha);
    q.events = p.events;
    q.act = inject.act;
    q.grad = inject.grad;
    q.g_init = p.g_init;
    q.dw = dw_acc.data_ptr<acc_t>();
    launch_dw_active<L>(q);
  }

  at::Tensor dx = at::empty({0}, opts), dw = at::empty({0}, opts), db = at::empty({0}, opts);
  if (full_dx) dx = at::mm(g_dense.view({T * B, n_out}), weight.to(acc_opts.dtype())).view({T, B, n_in}).to(opts.dtype());
  else if (need_dx) dx = dx_acc.to(opts.dtype());
  if (need_dw) dw = (dw_events ? dw_acc.t() : dw_acc).to(opts.dtype()).contiguous();
  if (need_db) db = db_acc.to(opts.dtype());
  return {dx, dw, db, dv};
}

template <class L>
LifGrads lif_backward_sparse(const at::Tensor& grad_spikes, const c10::optional<at::Tensor>& grad_v_final,
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
  const at::Tensor act_ptr = row_offsets(act_cnt, act_idx.numel(), weight.size(0), op, "act_cnt");
  const at::Tensor ev_ptr = row_offsets(ev_cnt, ev_idx.numel(), weight.size(1), op, "ev_cnt");
  c10::optional<at::Tensor> prev_ptr;
  if (prev_cnt.has_value()) prev_ptr = row_offsets(*prev_cnt, prev_idx->numel(), weight.size(1), op, "prev_cnt");
  c10::optional<at::Tensor> gV = contiguous(grad_v_final);
  const at::Tensor gS = grad_spikes.contiguous(), w = weight.contiguous();
  LifGrads out;
  AT_DISPATCH_FLOATING_TYPES(gS.scalar_type(), "sparsegrad_lif_backward_sparse_cuda", [&] {
    out = lif_backward_sparse_impl<L, scalar_t>(
        gS, gV, w, act_ptr, act_idx.contiguous(), act_sg.contiguous(), ev_ptr, ev_idx.contiguous(),
        ev_val.contiguous(), prev_ptr, contiguous(prev_idx), contiguous(rst_bits), alpha, need_dx,
        need_dw, need_db, need_dv, dw_route);
  });
  return out;
}

// ------------------------------------------------------------------------------------------------
// lif_backward_dense: reverse-scan kernel, then GEMMs and a sum through ATen.
// ------------------------------------------------------------------------------------------------
template <class L>
LifGrads lif_backward_dense(const at::Tensor& grad_spikes, const c10::optional<at::Tensor>& grad_v_final,
                            const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& sg_in,
                            const c10::optional<at::Tensor>& rst_bits_in, double alpha, bool need_dx,
                            bool need_dw, bool need_db, bool need_dv) {
  check_lif_backward_dense_args(grad_spikes, grad_v_final, x_in, weight_in, sg_in, rst_bits_in, alpha);
  const c10::optional<at::Tensor> rst_bits = contiguous(rst_bits_in);
  const int64_t T = grad_spikes.size(0), B = grad_spikes.size(1), n_in = weight_in.size(1),
                n_out = weight_in.size(0);
  const auto opts = grad_spikes.options();
  const c10::optional<at::Tensor> gV = contiguous(grad_v_final);
  const at::Tensor gS = grad_spikes.contiguous(), sg = sg_in.contiguous();
  at::Tensor G = at::empty({T, B, n_out}, opts);
  AT_DISPATCH_FLOATING_TYPES(gS.scalar_type(), "sparsegrad_lif_backward_dense_cuda", [&] {
    L::launch(B * n_out, &reverse_scan_kernel<scalar_t>, gS.data_ptr<scalar_t>(),
              sg.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(gV), ptr_or_null<int32_t>(rst_bits), T, B, n_out,
              static_cast<at::opmath_type<scalar_t>>(alpha), G.data_ptr<scalar_t>());
  });
  auto G2 = G.view({T * B, n_out});
  at::Tensor dx = need_dx ? at::mm(G2, weight_in.contiguous()).view({T, B, n_in}) : at::empty({0}, opts);
  at::Tensor dw = need_dw ? at::mm(G2.t(), x_in.contiguous().view({T * B, n_in})) : at::empty({0}, opts);
  at::Tensor db = need_db ? G2.sum(0) : at::empty({0}, opts);
  at::Tensor dv = need_dv ? initial_state_grad(G[0], rst_bits, alpha) : at::empty({0}, opts);
  return {dx, dw, db, dv};
}

// ------------------------------------------------------------------------------------------------
// li_readout_forward / li_readout_backward
// ------------------------------------------------------------------------------------------------
template <class L, typename scalar_t>
ReadoutForwardOutputs li_readout_forward_impl(const at::Tensor& x, const at::Tensor& weight,
                                              const c10::optional<at::Tensor>& bias, double alpha,
                                              int reduce) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = x.size(0), B = x.size(1), n_out = weight.size(0);
  const Events ev = build_events<L, scalar_t>(x);
  CurrentPlan<scalar_t> plan(x, weight, bias, ev);
  auto out = reduce == kReduceNone ? at::empty({T, B, n_out}, x.options()) : at::empty({B, n_out}, x.options());
  const auto long_opts = x.options().dtype(at::kLong);
  auto argmax = reduce == kReduceMax ? at::empty({B, n_out}, long_opts) : at::empty({0}, long_opts);
  ReadoutForwardArgs<scalar_t> a;
  a.current = plan.current;
  a.T = T;
  a.B = B;
  a.n_out = n_out;
  a.alpha = static_cast<acc_t>(alpha);
  a.reduce = reduce;
  a.out = out.data_ptr<scalar_t>();
  a.argmax = reduce == kReduceMax ? argmax.data_ptr<int64_t>() : nullptr;
  L::launch(B * n_out, &li_readout_forward_kernel<scalar_t>, a);
  return {out, argmax, ev.cnt, ev.idx, ev.val};
}

template <class L>
ReadoutForwardOutputs li_readout_forward(const at::Tensor& x_in, const at::Tensor& weight_in,
                                         const c10::optional<at::Tensor>& bias_in,
                                         const c10::optional<at::Tensor>& /*x_act_cnt*/,
                                         const c10::optional<at::Tensor>& /*x_act_idx*/,
                                         double alpha, c10::string_view reduce_name) {
  const int reduce = check_readout_forward_args(x_in, weight_in, bias_in, alpha, reduce_name);
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const c10::optional<at::Tensor> bias = contiguous(bias_in);
  ReadoutForwardOutputs out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparsegrad_li_readout_forward_cuda", [&] {
    out = li_readout_forward_impl<L, scalar_t>(x, weight, bias, alpha, reduce);
  });
  return out;
}

template <class L, typename scalar_t>
ReadoutGrads li_readout_backward_impl(const at::Tensor& grad_out, const at::Tensor& argmax,
                                      const at::Tensor& weight, const at::Tensor& ev_ptr,
                                      const at::Tensor& ev_idx, const at::Tensor& ev_val,
                                      const c10::optional<at::Tensor>& prev_ptr,
                                      const c10::optional<at::Tensor>& prev_idx, int64_t T,
                                      double alpha, int reduce, bool need_dx, bool need_dw,
                                      bool need_db) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = grad_out.size(-2), n_out = weight.size(0), n_in = weight.size(1);
  const auto opts = grad_out.options();
  const auto acc_opts = acc_options(grad_out);
  const bool full_dx = need_dx && !prev_ptr.has_value();
  TraceArgs<scalar_t> p;
  p.T = T;
  p.B = B;
  p.n_in = n_in;
  p.n_out = n_out;
  p.alpha = static_cast<acc_t>(alpha);
  p.scale = acc_t(1) - p.alpha;
  p.events = csr_view<scalar_t>(ev_ptr, ev_idx, ev_val);
  at::Tensor weight_t, dx_acc, g_dense, dw_acc, db_acc;
  if (need_dx && !full_dx) {
    weight_t = weight.t().contiguous();
    dx_acc = at::zeros({T, B, n_in}, acc_opts);
    p.weight_t = weight_t.data_ptr<scalar_t>();
    p.prev_ptr = prev_ptr->data_ptr<int64_t>();
    p.prev_idx = prev_idx->data_ptr<int32_t>();
    p.dx = dx_acc.data_ptr<acc_t>();
  }
  if (full_dx) {
    g_dense = at::zeros({T, B, n_out}, acc_opts);
    p.g_dense = g_dense.data_ptr<acc_t>();
  }
  if (need_db) {
    db_acc = at::zeros({n_out}, acc_opts);
    p.db = db_acc.data_ptr<acc_t>();
  }
  if (need_dw) {
    dw_acc = at::zeros({n_in, n_out}, acc_opts);
    p.dw_t = dw_acc.data_ptr<acc_t>();
  }
  ReadoutInject<scalar_t> inject;
  inject.grad = grad_out.data_ptr<scalar_t>();
  inject.argmax = reduce == kReduceMax ? argmax.data_ptr<int64_t>() : nullptr;
  inject.reduce = reduce;
  inject.per_step = reduce == kReduceMean ? acc_t(1) / acc_t(T) : acc_t(1);
  inject.B = B;
  inject.n_out = n_out;
  if (need_dx || need_dw || need_db)
    launch_trace_backward<L>(p, inject);

  at::Tensor dx = at::empty({0}, opts), dw = at::empty({0}, opts), db = at::empty({0}, opts);
  if (full_dx) {
    dx = (at::mm(g_dense.view({T * B, n_out}), weight.to(acc_opts.dtype())) * p.scale)
             .view({T, B, n_in}).to(opts.dtype());
  } else if (need_dx) {
    dx = dx_acc.to(opts.dtype());
  }
  if (need_dw) dw = (dw_acc.t() * p.scale).to(opts.dtype()).contiguous();
  if (need_db) db = (db_acc * p.scale).to(opts.dtype());
  return {dx, dw, db};
}

template <class L>
ReadoutGrads li_readout_backward(const at::Tensor& grad_out_in, const at::Tensor& argmax,
                                 const at::Tensor& weight_in, const at::Tensor& ev_cnt,
                                 const at::Tensor& ev_idx, const at::Tensor& ev_val,
                                 const c10::optional<at::Tensor>& prev_cnt,
                                 const c10::optional<at::Tensor>& prev_idx, int64_t num_steps,
                                 double alpha, c10::string_view reduce_name, bool need_dx,
                                 bool need_dw, bool need_db) {
  const char* op = "li_readout_backward";
  const int reduce = check_readout_backward_args(grad_out_in, argmax, weight_in, ev_cnt, ev_idx, ev_val,
                                                 prev_cnt, prev_idx, num_steps, alpha, reduce_name);
  const at::Tensor ev_ptr = row_offsets(ev_cnt, ev_idx.numel(), weight_in.size(1), op, "ev_cnt");
  c10::optional<at::Tensor> prev_ptr;
  if (prev_cnt.has_value()) prev_ptr = row_offsets(*prev_cnt, prev_idx->numel(), weight_in.size(1), op, "prev_cnt");
  ReadoutGrads out;
  AT_DISPATCH_FLOATING_TYPES(grad_out_in.scalar_type(), "sparsegrad_li_readout_backward_cuda", [&] {
    out = li_readout_backward_impl<L, scalar_t>(
        grad_out_in.contiguous(), argmax.contiguous(), weight_in.contiguous(), ev_ptr,
        ev_idx.contiguous(), ev_val.contiguous(), prev_ptr, contiguous(prev_idx),
        num_steps, alpha, reduce, need_dx, need_dw, need_db);
  });
  return out;
}

}  // namespace host
}  // namespace cuda
}  // namespace sparsegrad
