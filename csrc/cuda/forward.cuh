// Forward kernels: fused LIF layer and leaky-integrator readout. One thread per (b, j) walks the
// time steps with its state in registers; consecutive threads are consecutive j, so the reads of
// the input current and the writes of the spikes are coalesced.
#pragma once

#include "cuda/kernel_common.cuh"

namespace sparsegrad {
namespace cuda {

// I[t, b, j] = x[t, b, :] @ W[j, :] + bias[j], from a precomputed GEMM result (dense inputs) or
// from the input events (sparse inputs; W given transposed so that threads j read consecutive
// addresses). The event sum runs in the same order, with the same grouping, as the CPU kernel.
template <typename scalar_t>
struct InputCurrent {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* dense = nullptr;     // [T, B, N_out], or null
  CsrView<scalar_t> events;            // used when dense is null
  const scalar_t* weight_t = nullptr;  // [N_in, N_out]
  const scalar_t* bias = nullptr;      // [N_out] or null
  int64_t T = 0, B = 0, n_out = 0;

  __device__ __forceinline__ acc_t operator()(int64_t b, int64_t t, int64_t j) const {
    if (dense) return static_cast<acc_t>(dense[(t * B + b) * n_out + j]);
    acc_t cur = bias ? static_cast<acc_t>(bias[j]) : acc_t(0);
    const int64_t r = b * T + t;
    int64_t e = events.ptr[r];
    const int64_t e_end = events.ptr[r + 1];
    const scalar_t* w = weight_t + j;
    if (!events.val) {  // binary input: four weights per step, as the CPU kernel groups them
      for (; e + 4 <= e_end; e += 4) {
        cur += (static_cast<acc_t>(w[int64_t(events.idx[e]) * n_out]) +
                static_cast<acc_t>(w[int64_t(events.idx[e + 1]) * n_out])) +
               (static_cast<acc_t>(w[int64_t(events.idx[e + 2]) * n_out]) +
                static_cast<acc_t>(w[int64_t(events.idx[e + 3]) * n_out]));
      }
    }
    for (; e < e_end; ++e)
      cur += static_cast<acc_t>(events.value(e)) * static_cast<acc_t>(w[int64_t(events.idx[e]) * n_out]);
    return cur;
  }
};

template <typename scalar_t>
struct LifForwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  InputCurrent<scalar_t> current;
  int64_t T = 0, B = 0, n_out = 0;
  acc_t alpha = 0, threshold = 1, slope = 1;
  int surrogate = kFastSigmoid, reset = kResetSubtract;  // lif_math.h kinds
  const scalar_t* v_init = nullptr;  // [B, N_out] or null
  const scalar_t* s_init = nullptr;
  scalar_t* spikes = nullptr;        // [T, B, N_out]
  scalar_t* v_final = nullptr;       // [B, N_out]
  acc_t* v_trace = nullptr;          // sparse mode: V at every (t, b, j), for the compaction
  scalar_t* sg_dense = nullptr;      // dense mode: the surrogate at every (t, b, j)
  int64_t* spike_count = nullptr;    // one int64, accumulated atomically
};

// v_trace may alias current.dense (same element, same thread, read before written).
template <typename scalar_t>
__global__ void lif_forward_kernel(LifForwardArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  SG_KERNEL_LOOP(k, a.B * a.n_out) {
    const int64_t b = k / a.n_out, j = k % a.n_out;
    acc_t v = a.v_init ? static_cast<acc_t>(a.v_init[k]) : acc_t(0);
    acc_t s = a.s_init ? static_cast<acc_t>(a.s_init[k]) : acc_t(0);
    int64_t fired = 0;
    for (int64_t t = 0; t < a.T; ++t) {
      const int64_t at = (t * a.B + b) * a.n_out + j;
      v = math::integrate(v, a.current(b, t, j), s, a.alpha, a.threshold, a.reset);
      s = math::fire(v, a.threshold);
      a.spikes[at] = static_cast<scalar_t>(s);
      fired += s > acc_t(0);
      if (a.v_trace) a.v_trace[at] = v;
      if (a.sg_dense)
        a.sg_dense[at] = static_cast<scalar_t>(math::surrogate(v, a.threshold, a.slope, a.surrogate));
    }
    a.v_final[k] = static_cast<scalar_t>(v);
    if (fired) atomic_add_count(a.spike_count, fired);
  }
}

template <typename scalar_t>
struct ReadoutForwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  InputCurrent<scalar_t> current;
  int64_t T = 0, B = 0, n_out = 0;
  acc_t alpha = 0;
  int reduce = kReduceMax;
  scalar_t* out = nullptr;     // [B, N_out], or [T, B, N_out] for "none"
  int64_t* argmax = nullptr;   // [B, N_out] for "max"
};

template <typename scalar_t>
__global__ void li_readout_forward_kernel(ReadoutForwardArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  SG_KERNEL_LOOP(k, a.B * a.n_out) {
    const int64_t b = k / a.n_out, j = k % a.n_out;
    acc_t u = 0, acc = 0;
    int64_t arg = 0;
    for (int64_t t = 0; t < a.T; ++t) {
      u = math::leaky_integrate(u, a.current(b, t, j), a.alpha);
      switch (a.reduce) {
        case kReduceMax:  // first step reaching the maximum; a NaN wins, as torch.max(dim)
          if (t == 0 || u > acc || (u != u && acc == acc)) {
            acc = u;
            arg = t;
          }
          break;
        case kReduceSum:
        case kReduceMean:
          acc = t == 0 ? u : acc + u;
          break;
        default:
          a.out[(t * a.B + b) * a.n_out + j] = static_cast<scalar_t>(u);
          break;
      }
    }
    if (a.reduce == kReduceNone) continue;
    a.out[k] = static_cast<scalar_t>(a.reduce == kReduceMean ? acc / acc_t(a.T) : acc);
    if (a.argmax) a.argmax[k] = arg;
  }
}

}  // namespace cuda
}  // namespace sparsegrad
