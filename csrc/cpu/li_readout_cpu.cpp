// Leaky-integrator readout on the CPU: forward (with the time reduction fused in) and backward
// through the shared reverse-time walk.
#include <torch/library.h>

#include "low_precision.h"

#include <cstring>
#include <string>

#include "cpu/row_kernels.h"
#include "cpu/tiled_backward.h"
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
  const auto scan = scan_events<scalar_t>(x);
  const ScannedEvents& ev = scan->ev;
  const RowCurrent<scalar_t> current(x, weight, bias, *scan);

  auto out = reduce == kReduceNone ? at::empty({T, B, n_out}, x.options())
                                     : at::empty({B, n_out}, x.options());
  const auto long_opts = x.options().dtype(at::kLong);
  auto argmax = reduce == kReduceMax ? at::empty({B, n_out}, long_opts) : at::empty({0}, long_opts);
  scalar_t* o = out.data_ptr<scalar_t>();
  int64_t* am = reduce == kReduceMax ? argmax.data_ptr<int64_t>() : nullptr;

  const int64_t work_per_b = T * n_out + ev.nnz / std::max<int64_t>(B, 1) * n_out;
  profile::Scope timer(profile::kFwdRows);
  at::parallel_for(0, B, grain_for(work_per_b), [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> u(n_out), cur(current.width), acc(n_out);
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

// The readout's injections dL/dU[t, b, j] for the tiled walk, by reduction.
template <typename acc_t, typename scalar_t>
struct ReadoutInject {
  const scalar_t* g = nullptr;  // [B, N_out] ([T, B, N_out] for "none")
  int64_t T = 0, B = 0, n_out = 0;
  acc_t per_step = 1;
  ReduceKind reduce = kReduceSum;
  DeltaRows<acc_t> max_rows;    // "max": one entry per (b, j) at its argmax step
  bool operator()(int64_t b, int64_t t, int64_t j_lo, int64_t span, acc_t* buf) const {
    if (reduce == kReduceMax) {
      std::fill(buf, buf + span, acc_t(0));
      const int64_t r = b * T + t;
      bool any = false;
      for (int64_t e = max_rows.off[r]; e < max_rows.off[r + 1]; ++e) {
        const int64_t j = max_rows.idx[e] - j_lo;
        const bool inside = static_cast<uint64_t>(j) < static_cast<uint64_t>(span);
        buf[inside ? j : span] = max_rows.delta[e];
        any |= inside;
      }
      return any;
    }
    const int64_t n = std::max<int64_t>(0, std::min(span, n_out - j_lo));
    if (reduce == kReduceNone) {
      const scalar_t* row = g + (t * B + b) * n_out + j_lo;
      for (int64_t k = 0; k < n; ++k) buf[k] = static_cast<acc_t>(row[k]);
    } else {
      const scalar_t* row = g + b * n_out + j_lo;
      for (int64_t k = 0; k < n; ++k) buf[k] = per_step * static_cast<acc_t>(row[k]);
    }
    std::fill(buf + n, buf + span, acc_t(0));
    return n > 0;
  }
};

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
  const scalar_t* g = grad_out.data_ptr<scalar_t>();
  const acc_t per_step = reduce == kReduceMean ? acc_t(1) / acc_t(T) : acc_t(1);
  const bool dx_in_walk = need_dx && prev_ptr.has_value();

  at::Tensor dw = need_dw ? at::empty({n_out, n_in}, opts) : at::empty({0}, opts);
  at::Tensor db = need_db ? at::empty({n_out}, opts) : at::empty({0}, opts);
  at::Tensor dx = at::empty({0}, opts);
  if (need_dx) dx = dx_in_walk ? at::empty({T, B, n_in}, opts) : at::zeros({T, B, n_in}, opts);

  if (need_dw || need_db || dx_in_walk) {
    at::Tensor weight_t;
    const TiledProblem<scalar_t> p = events_problem<scalar_t>(
        T, B, weight, ev_ptr, ev_idx, ev_val, prev_ptr, prev_idx, alpha, weight_t,
        dx_in_walk ? dx : at::Tensor(), need_dw ? dw : at::Tensor(), need_db ? db : at::Tensor());

    ReadoutInject<acc_t, scalar_t> inject;
    inject.g = g;
    inject.T = T; inject.B = B; inject.n_out = n_out;
    inject.per_step = per_step;
    inject.reduce = reduce;
    // "max": the (b, j) entries grouped by their step (a counting sort; argmax_t outside [0, T)
    // injects nothing, as a comparison with every step would).
    std::vector<int64_t> off;
    std::vector<int32_t> idx;
    std::vector<acc_t> delta;
    if (reduce == kReduceMax) {
      const int64_t* am = argmax.data_ptr<int64_t>();
      off.assign(B * T + 1, 0);
      for (int64_t k = 0; k < B * n_out; ++k) {
        const int64_t t = am[k];
        if (t >= 0 && t < T) ++off[(k / n_out) * T + t + 1];
      }
      for (int64_t r = 0; r < B * T; ++r) off[r + 1] += off[r];
      idx.resize(std::max<int64_t>(1, off[B * T]));
      delta.resize(idx.size());
      std::vector<int64_t> next(off.begin(), off.end() - 1);
      for (int64_t k = 0; k < B * n_out; ++k) {  // ascending j within a row
        const int64_t t = am[k], b = k / n_out;
        if (t < 0 || t >= T) continue;
        const int64_t e = next[b * T + t]++;
        idx[e] = static_cast<int32_t>(k % n_out);
        delta[e] = static_cast<acc_t>(g[k]);
      }
      inject.max_rows = DeltaRows<acc_t>{off.data(), idx.data(), delta.data()};
    }
    tiled_backward<scalar_t>(p, inject);
  }

  if (need_dx && !dx_in_walk) {  // dx everywhere: the reverse walk in input space
    const int64_t* am = reduce == kReduceMax ? argmax.data_ptr<int64_t>() : nullptr;
    auto emit_all = [&](int64_t b, int64_t t, auto&& emit) {
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
    TraceProblem<scalar_t> p;
    set_readout_dims(p, T, B, n_in, n_out, static_cast<acc_t>(alpha));
    p.weight = weight.data_ptr<scalar_t>();
    p.dx = dx.data_ptr<scalar_t>();
    trace_backward<scalar_t>(p, emit_all);
  }
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
  check_index_range(ev_idx.contiguous(), weight_in.size(1), op, "ev_idx");
  if (prev_idx.has_value() && need_dx) check_index_range(prev_idx->contiguous(), weight_in.size(1), op, "prev_idx");
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
