// Leaky-integrator readout on the CPU: forward (with the time reduction fused in) and backward
// through the shared reverse-time walk.
#include <torch/library.h>

#include "low_precision.h"

#include <cstring>
#include <string>

#include "cpu/trace_backward.h"

namespace sparsegrad {
namespace cpu {
namespace {

using FwdOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <typename scalar_t>
FwdOut li_readout_forward_impl(const at::Tensor& x, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, double alpha_d, ReduceKind reduce) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = x.size(0), B = x.size(1), n_out = weight.size(0);
  const acc_t alpha = alpha_d;
  Events ev = build_events<scalar_t>(x);
  CurrentPlan<scalar_t> plan(x, weight, bias, ev);
  const InputCurrent<scalar_t>& current = plan.current;

  auto out = reduce == kReduceNone ? at::empty({T, B, n_out}, x.options())
                                     : at::empty({B, n_out}, x.options());
  const auto long_opts = x.options().dtype(at::kLong);
  auto argmax = reduce == kReduceMax ? at::empty({B, n_out}, long_opts) : at::empty({0}, long_opts);
  scalar_t* o = out.data_ptr<scalar_t>();
  int64_t* am = reduce == kReduceMax ? argmax.data_ptr<int64_t>() : nullptr;

  const int64_t work_per_b = T * n_out + ev.nnz / std::max<int64_t>(B, 1) * n_out;
  at::parallel_for(0, B, grain_for(work_per_b), [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> u(n_out), cur(n_out), acc(n_out);
    std::vector<int64_t> arg(n_out);
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(u.begin(), u.end(), acc_t(0));
      for (int64_t t = 0; t < T; ++t) {
        current.fill(b, t, cur.data());
        for (int64_t j = 0; j < n_out; ++j) {
          u[j] = math::leaky_integrate(u[j], cur[j], alpha);
          switch (reduce) {
            case kReduceMax:  // first time step reaching the maximum, as torch.max(dim)
              if (t == 0 || u[j] > acc[j] || (u[j] != u[j] && acc[j] == acc[j])) {
                acc[j] = u[j];
                arg[j] = t;
              }
              break;
            case kReduceSum:
            case kReduceMean:
              acc[j] = t == 0 ? u[j] : acc[j] + u[j];
              break;
            case kReduceNone:
              o[(t * B + b) * n_out + j] = static_cast<scalar_t>(u[j]);
              break;
          }
        }
      }
      if (reduce == kReduceNone) continue;
      for (int64_t j = 0; j < n_out; ++j) {
        const acc_t value = reduce == kReduceMean ? acc[j] / acc_t(T) : acc[j];
        o[b * n_out + j] = static_cast<scalar_t>(value);
        if (am) am[b * n_out + j] = arg[j];
      }
    }
  });
  return {out, argmax, ev.cnt, ev.idx, ev.val};
}

FwdOut li_readout_forward_cpu(const at::Tensor& x_in, const at::Tensor& weight_in,
                              const c10::optional<at::Tensor>& bias_in,
                              const c10::optional<at::Tensor>& /*x_act_cnt: used by the backward*/,
                              const c10::optional<at::Tensor>& /*x_act_idx*/, double alpha,
                              c10::string_view reduce_name) {
  const ReduceKind reduce = check_readout_forward_args(x_in, weight_in, bias_in, alpha, reduce_name);
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  c10::optional<at::Tensor> bias;
  if (bias_in.has_value()) bias = bias_in->contiguous();
  FwdOut out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "li_readout_forward_cpu", [&] {
    out = li_readout_forward_impl<scalar_t>(x, weight, bias, alpha, reduce);
  });
  return out;
}

using BwdOut = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

template <typename scalar_t>
BwdOut li_readout_backward_impl(const at::Tensor& grad_out, const at::Tensor& argmax,
                                const at::Tensor& weight, const at::Tensor& ev_ptr,
                                const at::Tensor& ev_idx, const at::Tensor& ev_val,
                                const c10::optional<at::Tensor>& prev_ptr,
                                const c10::optional<at::Tensor>& prev_idx, int64_t T, double alpha,
                                ReduceKind reduce, bool need_dx, bool need_dw, bool need_db) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = grad_out.size(-2), n_out = weight.size(0), n_in = weight.size(1);
  const auto opts = grad_out.options();
  const auto acc_opts = opts.dtype(c10::CppTypeToScalarType<acc_t>::value);
  const BatchChunks chunks(B);

  TraceProblem<scalar_t> p;
  p.T = T; p.B = B; p.n_in = n_in; p.n_out = n_out;
  p.alpha = static_cast<acc_t>(alpha);
  p.scale = acc_t(1) - p.alpha;
  p.weight = weight.data_ptr<scalar_t>();
  at::Tensor weight_t;
  if (need_dx && prev_ptr.has_value()) weight_t = restrict_dx(p, weight, *prev_ptr, *prev_idx);
  p.events = EventView<scalar_t>(ev_ptr, ev_idx, ev_val, T);
  at::Tensor dx = need_dx ? at::zeros({T, B, n_in}, opts) : at::empty({0}, opts);
  at::Tensor db_parts = need_db ? at::zeros({chunks.count, n_out}, acc_opts) : at::Tensor();
  at::Tensor dw_parts = need_dw ? at::zeros({chunks.count, n_in * n_out}, acc_opts) : at::Tensor();
  p.dx = need_dx ? dx.data_ptr<scalar_t>() : nullptr;
  p.db_parts = need_db ? db_parts.data_ptr<acc_t>() : nullptr;
  p.dw_t_parts = need_dw ? dw_parts.data_ptr<acc_t>() : nullptr;

  const scalar_t* g = grad_out.data_ptr<scalar_t>();
  const int64_t* am = reduce == kReduceMax ? argmax.data_ptr<int64_t>() : nullptr;
  const acc_t per_step = reduce == kReduceMean ? acc_t(1) / acc_t(T) : acc_t(1);
  auto inject = [&](int64_t b, int64_t t, auto&& emit) {
    for (int64_t j = 0; j < n_out; ++j) {
      switch (reduce) {
        case kReduceMax:
          if (am[b * n_out + j] == t) emit(j, static_cast<acc_t>(g[b * n_out + j]));
          break;
        case kReduceSum:
        case kReduceMean:
          emit(j, per_step * static_cast<acc_t>(g[b * n_out + j]));
          break;
        case kReduceNone:
          emit(j, static_cast<acc_t>(g[(t * B + b) * n_out + j]));
          break;
      }
    }
  };
  if (need_dx || need_dw || need_db) trace_backward<scalar_t>(p, inject);

  at::Tensor dw = at::empty({0}, opts), db = at::empty({0}, opts);
  if (need_dw) {
    dw = sum_chunks<scalar_t>(dw_parts, {n_in, n_out}, p.scale, opts).t().contiguous();
  }
  if (need_db) db = sum_chunks<scalar_t>(db_parts, {n_out}, p.scale, opts);
  return {dx, dw, db};
}

BwdOut li_readout_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& argmax,
                               const at::Tensor& weight_in, const at::Tensor& ev_cnt,
                               const at::Tensor& ev_idx, const at::Tensor& ev_val,
                               const c10::optional<at::Tensor>& prev_cnt,
                               const c10::optional<at::Tensor>& prev_idx, int64_t num_steps,
                               double alpha, c10::string_view reduce_name, bool need_dx,
                               bool need_dw, bool need_db) {
  const char* op = "li_readout_backward";
  const ReduceKind reduce = check_readout_backward_args(grad_out_in, argmax, weight_in, ev_cnt, ev_idx,
                                                        ev_val, prev_cnt, prev_idx, num_steps, alpha,
                                                        reduce_name);
  const at::Tensor ev_ptr = row_offsets(ev_cnt, ev_idx.numel(), weight_in.size(1), op, "ev_cnt");
  c10::optional<at::Tensor> prev_ptr;
  if (prev_cnt.has_value()) prev_ptr = row_offsets(*prev_cnt, prev_idx->numel(), weight_in.size(1), op, "prev_cnt");
  auto cont = [](const c10::optional<at::Tensor>& t) -> c10::optional<at::Tensor> {
    return t.has_value() ? c10::optional<at::Tensor>(t->contiguous()) : c10::nullopt;
  };
  BwdOut out;
  AT_DISPATCH_FLOATING_TYPES(grad_out_in.scalar_type(), "li_readout_backward_cpu", [&] {
    out = li_readout_backward_impl<scalar_t>(grad_out_in.contiguous(), argmax.contiguous(),
                                             weight_in.contiguous(), ev_ptr,
                                             ev_idx.contiguous(), ev_val.contiguous(), prev_ptr,
                                             cont(prev_idx), num_steps, alpha, reduce, need_dx,
                                             need_dw, need_db);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsegrad, CPU, m) {
  m.impl("li_readout_forward", SG_FLOAT32_MATH(li_readout_forward_cpu));
  m.impl("li_readout_backward", SG_FLOAT32_MATH(li_readout_backward_cpu));
}

}  // namespace cpu
}  // namespace sparsegrad
