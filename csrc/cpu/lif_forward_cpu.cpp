// Fused LIF forward on the CPU: input current, membrane recurrence, spikes and (sparse mode) the
// compact active set, in one pass over time per batch element.
#include <torch/library.h>

#include "low_precision.h"

#include "cpu/cpu_common.h"

namespace sparsegrad {
namespace cpu {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                           at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <typename scalar_t>
Outputs lif_forward_impl(const at::Tensor& x, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& v_init,
                         const c10::optional<at::Tensor>& s_init, double alpha_d, double threshold_d,
                         double b_th_d, double slope_d, bool sparse, NeuronKinds kinds) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = x.size(0), B = x.size(1), n_out = weight.size(0);
  const acc_t alpha = alpha_d, threshold = threshold_d, b_th = b_th_d, slope = slope_d;

  Events ev = build_events<scalar_t>(x);
  CurrentPlan<scalar_t> plan(x, weight, bias, ev);
  const InputCurrent<scalar_t>& current = plan.current;

  auto spikes = at::empty({T, B, n_out}, x.options());
  auto v_final = at::empty({B, n_out}, x.options());
  at::Tensor dense_sg = sparse ? at::empty({0}, x.options()) : at::empty({T, B, n_out}, x.options());
  // Reset to zero: the backward needs the spikes that reset V (rst_bits, op_schemas.h).
  const bool zero_reset = kinds.reset == kResetZero;
  const int64_t words = bit_words(n_out);
  at::Tensor rst_bits = zero_reset ? at::zeros({T, B, words}, x.options().dtype(at::kInt))
                                   : at::empty({0}, x.options().dtype(at::kInt));
  int32_t* rst = zero_reset ? rst_bits.data_ptr<int32_t>() : nullptr;
  const int surrogate = kinds.surrogate, reset = kinds.reset;
  scalar_t* spk = spikes.data_ptr<scalar_t>();
  scalar_t* vfin = v_final.data_ptr<scalar_t>();
  scalar_t* sg_dense = sparse ? nullptr : dense_sg.data_ptr<scalar_t>();
  const scalar_t* v0 = v_init.has_value() ? v_init->data_ptr<scalar_t>() : nullptr;
  const scalar_t* s0 = s_init.has_value() ? s_init->data_ptr<scalar_t>() : nullptr;

  // Sparse mode: per batch element, the active entries in (t, j) order, and per-row counts.
  std::vector<std::vector<int32_t>> act_idx(sparse ? B : 0);
  std::vector<std::vector<scalar_t>> act_sg(sparse ? B : 0);
  auto act_ptr = at::empty({sparse ? B * T + 1 : 0}, x.options().dtype(at::kLong));
  int64_t* aptr = sparse ? act_ptr.data_ptr<int64_t>() : nullptr;
  std::vector<int64_t> spike_count(B, 0);

  const int64_t work_per_b = T * n_out + ev.nnz / std::max<int64_t>(B, 1) * n_out;
  at::parallel_for(0, B, grain_for(work_per_b), [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> v(n_out), s(n_out), cur(n_out);
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t j = 0; j < n_out; ++j) {
        v[j] = v0 ? static_cast<acc_t>(v0[b * n_out + j]) : acc_t(0);
        s[j] = s0 ? static_cast<acc_t>(s0[b * n_out + j]) : acc_t(0);
      }
      int64_t count = 0;
      for (int64_t t = 0; t < T; ++t) {
        current.fill(b, t, cur.data());
        const int64_t row = (t * B + b) * n_out;
        if (rst) {  // R[t] = S[t-1]
          int32_t* bits = rst + (t * B + b) * words;
          for (int64_t j = 0; j < n_out; ++j)
            if (s[j] > acc_t(0)) bits[j >> 5] |= static_cast<int32_t>(1u << (j & 31));
        }
        // Separate simple loops so that each one vectorises.
        for (int64_t j = 0; j < n_out; ++j) {
          v[j] = math::integrate(v[j], cur[j], s[j], alpha, threshold, reset);
          s[j] = math::fire(v[j], threshold);
          spk[row + j] = static_cast<scalar_t>(s[j]);
        }
        int32_t fired = 0, active = 0;
        for (int64_t j = 0; j < n_out; ++j) fired += s[j] > acc_t(0);
        count += fired;
        if (sparse) {
          for (int64_t j = 0; j < n_out; ++j) active += math::is_active(v[j], threshold, b_th);
          for (int64_t j = 0; j < n_out && active > 0; ++j) {
            if (math::is_active(v[j], threshold, b_th)) {
              --active;
              act_idx[b].push_back(static_cast<int32_t>(j));
              act_sg[b].push_back(static_cast<scalar_t>(math::surrogate(v[j], threshold, slope, surrogate)));
            }
          }
          aptr[b * T + t + 1] = static_cast<int64_t>(act_idx[b].size());  // local to b for now
        } else {
          for (int64_t j = 0; j < n_out; ++j)
            sg_dense[row + j] = static_cast<scalar_t>(math::surrogate(v[j], threshold, slope, surrogate));
        }
      }
      for (int64_t j = 0; j < n_out; ++j) vfin[b * n_out + j] = static_cast<scalar_t>(v[j]);
      spike_count[b] = count;
    }
  });

  int64_t total_spikes = 0;
  for (int64_t b = 0; b < B; ++b) total_spikes += spike_count[b];
  auto stats = at::empty({3}, x.options().dtype(at::kLong));
  int64_t* st = stats.data_ptr<int64_t>();
  st[0] = total_spikes;
  st[2] = ev.nnz;

  if (!sparse) {
    st[1] = T * B * n_out;
    auto empty_int = [&] { return at::empty({0}, x.options().dtype(at::kInt)); };
    return {spikes, v_final, empty_int(), empty_int(), dense_sg, empty_int(), empty_int(),
            at::empty({0}, x.options()), rst_bits, stats};
  }

  // Concatenate the per-batch lists in batch order: rows b*T + t are then in CSR order.
  std::vector<int64_t> base(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) base[b + 1] = base[b] + static_cast<int64_t>(act_idx[b].size());
  const int64_t n_active = base[B];
  st[1] = n_active;
  aptr[0] = 0;
  auto idx_out = at::empty({n_active}, x.options().dtype(at::kInt));
  auto sg_out = at::empty({n_active}, x.options());
  int32_t* ip = idx_out.data_ptr<int32_t>();
  scalar_t* sp = sg_out.data_ptr<scalar_t>();
  at::parallel_for(0, B, grain_for(T + n_active / std::max<int64_t>(B, 1)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t t = 0; t < T; ++t) aptr[b * T + t + 1] += base[b];
      std::copy(act_idx[b].begin(), act_idx[b].end(), ip + base[b]);
      std::copy(act_sg[b].begin(), act_sg[b].end(), sp + base[b]);
    }
  });
  return {spikes, v_final, counts_from_offsets(act_ptr), idx_out, sg_out, ev.cnt, ev.idx, ev.val,
          rst_bits, stats};
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
  auto contiguous = [](const c10::optional<at::Tensor>& t) -> c10::optional<at::Tensor> {
    return t.has_value() ? c10::optional<at::Tensor>(t->contiguous()) : c10::nullopt;
  };
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
