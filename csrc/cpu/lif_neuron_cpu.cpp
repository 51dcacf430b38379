// The LIF neuron alone on the CPU (after a convolution, a pooling layer or any other per-step
// layer): the membrane recurrence fused over time, and its reverse-time backward.
//
// Forward: one task per batch element walks t = 0..T-1 over the N neurons of a row
// current[t, b, :], so every read and write is a contiguous row. Sparse mode records the active
// entries (|V - threshold| < b_th) in (t, j) order per batch element, then concatenates them in
// batch order: rows b*T + t are then a CSR. Backward: one task per (batch element, block of
// neurons) walks t = T-1..0 keeping G for its block in a small buffer. No reduction crosses tasks,
// so results do not depend on the number of threads.
#include <torch/library.h>

#include "low_precision.h"

#include "cpu/cpu_common.h"

namespace sparsegrad {
namespace cpu {
namespace {

using NeuronOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                 at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The SpikingJelly-specific settings of the op (dynamics != kChargeLeaky).
struct SJParams {
  int dynamics = kChargeLeaky;
  double tau = 2.0, v_reset = 0.0;
  bool detach_reset = true;
};

// Spikes of one row as bits: word w holds neurons 32w .. 32w+31 (bit k = neuron 32w + k).
template <typename acc_t>
inline void pack_bits(const acc_t* s, int64_t n, int32_t* words) {
  for (int64_t w = 0; w * 32 < n; ++w) {
    const int64_t j0 = w * 32, j1 = std::min(n, j0 + 32);
    uint32_t word = 0;
    for (int64_t j = j0; j < j1; ++j) word |= static_cast<uint32_t>(s[j] > acc_t(0)) << (j - j0);
    words[w] = static_cast<int32_t>(word);
  }
}

inline bool bit_set(const int32_t* words, int64_t j) { return test_bit(words, j); }

// Row helpers of the forward: each is one loop over a row of N neurons with restrict pointers
// and the reset / surrogate fixed at compile time, so that the compiler vectorises it (a loop
// over math:: calls with a run-time kind and possibly aliasing rows stays scalar and branchy).

// One step of the leaky membrane for a row: V = integrate(V, I, S), S = fire(V), spikes out.
template <int kReset, typename scalar_t, typename acc_t>
inline void leaky_step_row(int64_t n, const scalar_t* __restrict__ cur, acc_t* __restrict__ v,
                           acc_t* __restrict__ s, scalar_t* __restrict__ spk, acc_t alpha,
                           acc_t threshold) {
  for (int64_t j = 0; j < n; ++j) {
    const acc_t vj = math::integrate(v[j], static_cast<acc_t>(cur[j]), s[j], alpha, threshold, kReset);
    const acc_t sj = math::fire(vj, threshold);
    v[j] = vj;
    s[j] = sj;
    spk[j] = static_cast<scalar_t>(sj);
  }
}

template <typename scalar_t, typename acc_t>
inline void leaky_step_row(int reset, int64_t n, const scalar_t* cur, acc_t* v, acc_t* s,
                           scalar_t* spk, acc_t alpha, acc_t threshold) {
  switch (reset) {
    case kResetZero: return leaky_step_row<kResetZero>(n, cur, v, s, spk, alpha, threshold);
    case kResetNone: return leaky_step_row<kResetNone>(n, cur, v, s, spk, alpha, threshold);
    default: return leaky_step_row<kResetSubtract>(n, cur, v, s, spk, alpha, threshold);
  }
}

// The surrogate of every neuron of a row (dense mode).
template <int kKind, typename scalar_t, typename acc_t>
inline void surrogate_row(int64_t n, const acc_t* __restrict__ h, scalar_t* __restrict__ out,
                          acc_t threshold, acc_t slope) {
  for (int64_t j = 0; j < n; ++j)
    out[j] = static_cast<scalar_t>(math::surrogate(h[j], threshold, slope, kKind));
}

template <typename scalar_t, typename acc_t>
inline void surrogate_row(int kind, int64_t n, const acc_t* h, scalar_t* out, acc_t threshold,
                          acc_t slope) {
  switch (kind) {
    case kAtan: return surrogate_row<kAtan>(n, h, out, threshold, slope);
    case kSigmoid: return surrogate_row<kSigmoid>(n, h, out, threshold, slope);
    case kTriangle: return surrogate_row<kTriangle>(n, h, out, threshold, slope);
    default: return surrogate_row<kFastSigmoid>(n, h, out, threshold, slope);
  }
}

// The active neurons of a row (|h - threshold| < b_th), ascending, into idx; returns how many.
// Branch-free: every index is written, the position advances only on active ones.
template <typename acc_t>
inline int64_t active_row(int64_t n, const acc_t* __restrict__ h, int32_t* __restrict__ idx,
                          acc_t threshold, acc_t b_th) {
  int64_t k = 0;
  for (int64_t j = 0; j < n; ++j) {
    idx[k] = static_cast<int32_t>(j);
    k += math::is_active(h[j], threshold, b_th) ? 1 : 0;
  }
  return k;
}

template <typename scalar_t>
NeuronOutputs forward_impl(const at::Tensor& current, const c10::optional<at::Tensor>& v_init,
                           const c10::optional<at::Tensor>& s_init, double alpha_d,
                           double threshold_d, double b_th_d, double slope_d, bool sparse,
                           int surrogate, int reset, bool return_mem, const SJParams& sj) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = current.size(0), B = current.size(1), N = current.size(2), W = bit_words(N);
  const acc_t alpha = alpha_d, threshold = threshold_d, b_th = b_th_d, slope = slope_d;
  const bool keep_bits = reset == kResetZero;
  const bool leaky = sj.dynamics == kChargeLeaky;
  const bool keep_rg = !leaky && !sj.detach_reset;
  const acc_t tau = sj.tau, v_reset = sj.v_reset;

  auto spikes = at::empty({T, B, N}, current.options());
  auto v_final = at::empty({B, N}, current.options());
  auto sg_dense = at::empty({sparse ? 0 : T * B * N}, current.options());
  auto mem = at::empty({return_mem ? T : 0, B, N}, current.options());
  auto rst_bits = at::empty({keep_bits ? T : 0, B, W}, current.options().dtype(at::kInt));
  if (!keep_bits) rst_bits = rst_bits.reshape({0});
  if (!return_mem) mem = mem.reshape({0});
  auto act_cnt = at::empty({sparse ? B * T : 0}, current.options().dtype(at::kInt));
  auto rg_dense = at::empty({keep_rg && !sparse ? T * B * N : 0}, current.options());

  const scalar_t* in = current.data_ptr<scalar_t>();
  scalar_t* spk = spikes.data_ptr<scalar_t>();
  scalar_t* vfin = v_final.data_ptr<scalar_t>();
  scalar_t* sgd = sparse ? nullptr : sg_dense.data_ptr<scalar_t>();
  scalar_t* rgd = keep_rg && !sparse ? rg_dense.data_ptr<scalar_t>() : nullptr;
  scalar_t* memp = return_mem ? mem.data_ptr<scalar_t>() : nullptr;
  int32_t* bits = keep_bits ? rst_bits.data_ptr<int32_t>() : nullptr;
  int32_t* cnt = sparse ? act_cnt.data_ptr<int32_t>() : nullptr;
  const scalar_t* v0 = v_init.has_value() ? v_init->data_ptr<scalar_t>() : nullptr;
  const scalar_t* s0 = s_init.has_value() ? s_init->data_ptr<scalar_t>() : nullptr;

  std::vector<std::vector<int32_t>> act_idx(sparse ? B : 0);
  std::vector<std::vector<scalar_t>> act_sg(sparse ? B : 0);
  std::vector<std::vector<scalar_t>> act_rg(sparse && keep_rg ? B : 0);
  // The reset's own gradient term at an entry (detach_reset=False): dV_post/dH beyond (1 - S).
  auto reset_term = [&](acc_t h, acc_t sg) -> acc_t {
    return reset == kResetZero ? (v_reset - h) * sg : -threshold * sg;
  };
  std::vector<int64_t> spike_count(B, 0), nonzero_count(B, 0);

  at::parallel_for(0, B, grain_for(T * N), [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> v(N), s(N), h_buf(leaky ? 0 : N);
    std::vector<int32_t> row_idx(sparse ? N + 1 : 0);  // active_row writes one past the count
    // The membrane the spike is read from: V itself (leaky), or the charge H (SpikingJelly).
    acc_t* h = leaky ? v.data() : h_buf.data();
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t j = 0; j < N; ++j) {
        v[j] = v0 ? static_cast<acc_t>(v0[b * N + j]) : acc_t(0);
        s[j] = s0 ? static_cast<acc_t>(s0[b * N + j]) : acc_t(0);
      }
      int64_t fired = 0, nonzero = 0;
      for (int64_t t = 0; t < T; ++t) {
        const int64_t row = (t * B + b) * N;
        const scalar_t* cur = in + row;
        // Separate simple loops so that each one vectorises.
        if (leaky) {
          if (bits) pack_bits(s.data(), N, bits + (t * B + b) * W);  // R[t] = S[t-1]
          leaky_step_row(reset, N, cur, v.data(), s.data(), spk + row, alpha, threshold);
        } else {
          const bool hard = reset == kResetZero;
          for (int64_t j = 0; j < N; ++j) {
            h[j] = math::sj_charge(v[j], static_cast<acc_t>(cur[j]), tau, v_reset, sj.dynamics);
            s[j] = math::sj_fire(h[j], threshold);
            spk[row + j] = static_cast<scalar_t>(s[j]);
            v[j] = math::sj_reset(h[j], s[j], threshold, v_reset, hard);
          }
          if (bits) pack_bits(s.data(), N, bits + (t * B + b) * W);  // S[t], resets after step t
        }
        for (int64_t j = 0; j < N; ++j) {
          fired += s[j] > acc_t(0);
          nonzero += cur[j] != scalar_t(0);
        }
        if (memp)
          for (int64_t j = 0; j < N; ++j) memp[row + j] = static_cast<scalar_t>(h[j]);
        if (sparse) {
          const int64_t active = active_row(N, h, row_idx.data(), threshold, b_th);
          cnt[b * T + t] = static_cast<int32_t>(active);
          const size_t at = act_idx[b].size();
          act_idx[b].insert(act_idx[b].end(), row_idx.begin(), row_idx.begin() + active);
          act_sg[b].resize(at + active);
          if (keep_rg) act_rg[b].resize(at + active);
          scalar_t* sg_b = act_sg[b].data() + at;
          for (int64_t e = 0; e < active; ++e) {
            const int32_t j = row_idx[e];
            const acc_t g = math::surrogate(h[j], threshold, slope, surrogate);
            sg_b[e] = static_cast<scalar_t>(g);
            if (keep_rg) act_rg[b][at + e] = static_cast<scalar_t>(reset_term(h[j], g));
          }
        } else {
          surrogate_row(surrogate, N, h, sgd + row, threshold, slope);
          if (rgd)
            for (int64_t j = 0; j < N; ++j)
              rgd[row + j] = static_cast<scalar_t>(reset_term(h[j], static_cast<acc_t>(sgd[row + j])));
        }
      }
      for (int64_t j = 0; j < N; ++j) vfin[b * N + j] = static_cast<scalar_t>(v[j]);
      spike_count[b] = fired;
      nonzero_count[b] = nonzero;
    }
  });

  auto stats = at::empty({3}, current.options().dtype(at::kLong));
  int64_t* st = stats.data_ptr<int64_t>();
  st[0] = st[2] = 0;
  for (int64_t b = 0; b < B; ++b) {
    st[0] += spike_count[b];
    st[2] += nonzero_count[b];
  }
  if (!sparse) {
    st[1] = T * B * N;
    return {spikes, v_final, act_cnt, at::empty({0}, current.options().dtype(at::kInt)),
            sg_dense.view({T, B, N}), keep_rg ? rg_dense.view({T, B, N}) : rg_dense, rst_bits, mem,
            stats};
  }
  std::vector<int64_t> base(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) base[b + 1] = base[b] + static_cast<int64_t>(act_idx[b].size());
  st[1] = base[B];
  auto idx_out = at::empty({base[B]}, current.options().dtype(at::kInt));
  auto sg_out = at::empty({base[B]}, current.options());
  auto rg_out = at::empty({keep_rg ? base[B] : 0}, current.options());
  int32_t* ip = idx_out.data_ptr<int32_t>();
  scalar_t* sp = sg_out.data_ptr<scalar_t>();
  scalar_t* rp = keep_rg ? rg_out.data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, B, grain_for(base[B] / std::max<int64_t>(B, 1) + 1), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      std::copy(act_idx[b].begin(), act_idx[b].end(), ip + base[b]);
      std::copy(act_sg[b].begin(), act_sg[b].end(), sp + base[b]);
      if (rp) std::copy(act_rg[b].begin(), act_rg[b].end(), rp + base[b]);
    }
  });
  return {spikes, v_final, act_cnt, idx_out, sg_out, rg_out, rst_bits, mem, stats};
}

// Neurons per backward task: G for a block stays in L1.
constexpr int64_t kNeuronBlock = 512;

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& grad_spikes, const c10::optional<at::Tensor>& grad_v_final,
    const c10::optional<at::Tensor>& grad_mem, const at::Tensor& act_cnt, const at::Tensor& act_idx,
    const at::Tensor& act_sg, const c10::optional<at::Tensor>& act_rg,
    const c10::optional<at::Tensor>& rst_bits, double alpha_d, bool sparse, bool need_dv,
    bool leaky, double input_scale_d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = grad_spikes.size(0), B = grad_spikes.size(1), N = grad_spikes.size(2);
  const int64_t W = bit_words(N);
  const acc_t alpha = alpha_d, input_scale = input_scale_d;
  const int reset = rst_bits.has_value() ? kResetZero : kResetSubtract;

  auto grad_current = at::empty({T, B, N}, grad_spikes.options());
  auto dv = at::empty({need_dv ? B : 0, N}, grad_spikes.options());
  if (!need_dv) dv = dv.reshape({0});
  const scalar_t* gs = grad_spikes.data_ptr<scalar_t>();
  const scalar_t* gvf = grad_v_final.has_value() ? grad_v_final->data_ptr<scalar_t>() : nullptr;
  const scalar_t* gm = grad_mem.has_value() ? grad_mem->data_ptr<scalar_t>() : nullptr;
  const scalar_t* sg = act_sg.data_ptr<scalar_t>();
  const scalar_t* rg = act_rg.has_value() ? act_rg->data_ptr<scalar_t>() : nullptr;
  const int32_t* bits = rst_bits.has_value() ? rst_bits->data_ptr<int32_t>() : nullptr;
  scalar_t* gc = grad_current.data_ptr<scalar_t>();
  scalar_t* dvp = need_dv ? dv.data_ptr<scalar_t>() : nullptr;

  // Row offsets of the active set (rows b*T + t), checked against the index length.
  const at::Tensor offsets = sparse ? row_offsets(act_cnt, act_idx.numel(), N, "lif_neuron_backward",
                                                  "act_cnt")
                                    : at::empty({0}, act_cnt.options().dtype(at::kLong));
  if (sparse) check_columns(offsets, act_idx, N, "lif_neuron_backward", "act_idx");
  const int64_t* offs = sparse ? offsets.data_ptr<int64_t>() : nullptr;
  const int32_t* idx = sparse ? act_idx.data_ptr<int32_t>() : nullptr;

  const int64_t blocks = (N + kNeuronBlock - 1) / kNeuronBlock;
  at::parallel_for(0, B * blocks, grain_for(T * std::min(N, kNeuronBlock)), [&](int64_t k0, int64_t k1) {
    // g: G[t] = dL/dV[t] (leaky) or dL/dH[t] (SpikingJelly); carry: dL/dV_post[t] (SpikingJelly).
    std::vector<acc_t> g(std::min(N, kNeuronBlock)), carry(leaky ? 0 : g.size());
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t b = k / blocks, j0 = (k % blocks) * kNeuronBlock;
      const int64_t n = std::min(N - j0, kNeuronBlock);
      for (int64_t j = 0; j < n; ++j) g[j] = gvf ? static_cast<acc_t>(gvf[b * N + j0 + j]) : acc_t(0);
      for (int64_t t = T - 1; t >= 0; --t) {
        const int64_t row = (t * B + b) * N + j0;
        if (leaky) {
          if (t < T - 1) {  // G[t] = trace_decay(alpha, R[t+1]) * G[t+1] + ...
            if (bits) {
              const int32_t* r = bits + ((t + 1) * B + b) * W;
              for (int64_t j = 0; j < n; ++j) g[j] *= math::trace_decay(alpha, bit_set(r, j0 + j), reset);
            } else {
              scale_inplace(n, alpha, g.data());
            }
          }
        } else {
          // carry = dL/dV_post[t]: grad_v_final at the last step, else alpha * G[t+1]; the reset
          // after step t passes it on times (1 - S[t]) (hard) or 1 (soft).
          if (t < T - 1) scale_inplace(n, alpha, g.data());
          for (int64_t j = 0; j < n; ++j) carry[j] = g[j];
          if (bits) {
            const int32_t* r = bits + (t * B + b) * W;
            for (int64_t j = 0; j < n; ++j) g[j] = bit_set(r, j0 + j) ? acc_t(0) : g[j];
          }
        }
        if (gm)
          for (int64_t j = 0; j < n; ++j) g[j] += static_cast<acc_t>(gm[row + j]);
        if (sparse) {
          const int64_t r = b * T + t;
          const int32_t* lo = std::lower_bound(idx + offs[r], idx + offs[r + 1], static_cast<int32_t>(j0));
          for (int64_t e = lo - idx; e < offs[r + 1] && idx[e] < j0 + n; ++e) {
            const int64_t j = idx[e] - j0;
            if (rg) g[j] += carry[j] * static_cast<acc_t>(rg[e]);
            g[j] += static_cast<acc_t>(gs[row + j]) * static_cast<acc_t>(sg[e]);
          }
        } else {
          if (rg)
            for (int64_t j = 0; j < n; ++j) g[j] += carry[j] * static_cast<acc_t>(rg[row + j]);
          for (int64_t j = 0; j < n; ++j)
            g[j] += static_cast<acc_t>(gs[row + j]) * static_cast<acc_t>(sg[row + j]);
        }
        if (leaky) {
          for (int64_t j = 0; j < n; ++j) gc[row + j] = static_cast<scalar_t>(g[j]);
        } else {
          for (int64_t j = 0; j < n; ++j) gc[row + j] = static_cast<scalar_t>(g[j] * input_scale);
        }
      }
      if (dvp) {
        const int32_t* r = bits && leaky ? bits + b * W : nullptr;
        for (int64_t j = 0; j < n; ++j)
          dvp[b * N + j0 + j] = static_cast<scalar_t>(  // T = 0: V_final is V_init, g = grad_v_final
              T > 0 ? math::trace_decay(alpha, r != nullptr && bit_set(r, j0 + j), reset) * g[j] : g[j]);
      }
    }
  });
  return {grad_current, dv};
}

NeuronOutputs lif_neuron_forward_cpu(const at::Tensor& current_in,
                                     const c10::optional<at::Tensor>& v_init,
                                     const c10::optional<at::Tensor>& s_init, double alpha,
                                     double threshold, double b_th, double slope, bool sparse,
                                     c10::string_view surrogate, c10::string_view reset,
                                     bool return_mem, c10::string_view dynamics, double tau,
                                     double v_reset, bool detach_reset) {
  const NeuronOpKinds kinds = check_lif_neuron_forward_args(current_in, v_init, s_init, alpha,
                                                          threshold, b_th, slope, surrogate, reset,
                                                          return_mem, dynamics, tau);
  const SJParams sj{kinds.dynamics, tau, v_reset, detach_reset};
  const at::Tensor current = current_in.contiguous();
  NeuronOutputs out;
  AT_DISPATCH_FLOATING_TYPES(current.scalar_type(), "lif_neuron_forward_cpu", [&] {
    out = forward_impl<scalar_t>(current, contiguous(v_init), contiguous(s_init), alpha, threshold,
                                 b_th, slope, sparse, kinds.surrogate, kinds.reset, return_mem, sj);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> lif_neuron_backward_cpu(
    const at::Tensor& grad_spikes_in, const c10::optional<at::Tensor>& grad_v_final,
    const c10::optional<at::Tensor>& grad_mem, const at::Tensor& act_cnt,
    const at::Tensor& act_idx, const at::Tensor& act_sg, const c10::optional<at::Tensor>& act_rg,
    const c10::optional<at::Tensor>& rst_bits, double alpha, bool sparse, bool need_dv,
    c10::string_view dynamics, double input_scale) {
  const bool has_rst = check_lif_neuron_backward_args(grad_spikes_in, grad_v_final, grad_mem,
                                                      act_cnt, act_idx, act_sg, act_rg, rst_bits,
                                                      alpha, sparse, dynamics);
  const bool leaky = parse_dynamics(dynamics, "lif_neuron_backward") == kChargeLeaky;
  const bool has_rg = act_rg.has_value() && act_rg->numel() > 0;
  const at::Tensor grad_spikes = grad_spikes_in.contiguous();
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(grad_spikes.scalar_type(), "lif_neuron_backward_cpu", [&] {
    out = backward_impl<scalar_t>(grad_spikes, contiguous(grad_v_final), contiguous(grad_mem),
                                  act_cnt.contiguous(), act_idx.contiguous(), act_sg.contiguous(),
                                  has_rg && !leaky ? contiguous(act_rg) : c10::nullopt,
                                  has_rst ? contiguous(rst_bits) : c10::nullopt, alpha, sparse,
                                  need_dv, leaky, input_scale);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsegrad, CPU, m) {
  m.impl("lif_neuron_forward", SG_FLOAT32_MATH(lif_neuron_forward_cpu));
  m.impl("lif_neuron_backward", SG_FLOAT32_MATH(lif_neuron_backward_cpu));
}

}  // namespace cpu
}  // namespace sparsegrad
