// Backward kernels.
//
// Sparse backward (LIF and readout). Per batch element b the gradient trace over output neurons is
//     G[t] = alpha * G[t+1] + delta[t]        (G[T-1] starts from dL/dV_final, if given)
// with delta nonzero only at a few (t, j) entries. One thread owns (b, a tile of kTile output
// neurons), keeps G for its tile in registers and walks t backwards. Per step it
//   - binary-searches the row (b, t) of the active set for its tile's first entry and adds the
//     deltas of its tile (active sets are sorted by j within a row),
//   - adds G to its db partial sums,
//   - dW via input events: for each event (t, b, i) of the row, dW^T[i, tile] += x * G[tile],
//   - dx on the producer's active set: for each entry (t, b, i), dx += G[tile] . W^T[i, tile],
//   - or, when dx is wanted everywhere, stores G for a GEMM (dx = G W) afterwards.
// Memory traffic is proportional to the active entries, the input events and the producer's
// active entries; the per-step register work is T*B*N_out multiplies. Cross-thread sums (dW, db,
// dx) go through atomicAdd.
//
// The tile width is a template parameter. The GPU build uses kTile = 1 (host_ops.h): consecutive
// threads of a warp are then consecutive neurons of one batch element, so their reads of a row
// are broadcasts and their atomics on dW^T[i, j..j+31] one coalesced transaction, and G is a
// single register. Wider tiles trade that for fewer threads; the emulation tests run them too.
//
// dW via active entries (the other route, better for dense inputs): one thread per (b, tile of kTile
// input neurons) walks t forwards keeping the input trace X[t] = alpha X[t-1] + x[t] for its tile,
// and for each active entry (t, b, j) adds delta * X[tile] to dW[j, tile].
//
// Dense backward: a reverse scan per (b, j) over every step (the GEMMs are ATen/cuBLAS calls).
#pragma once

#include "cuda/kernel_common.cuh"

namespace sparsegrad {
namespace cuda {

template <typename scalar_t>
struct TraceArgs {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t T = 0, B = 0, n_in = 0, n_out = 0;
  acc_t alpha = 0, scale = 1;          // scale: 1 for LIF, 1 - alpha for the readout (dx only)
  const scalar_t* g_init = nullptr;    // [B, N_out] dL/dV_final, or null
  CsrView<scalar_t> events;            // input events, for dW via events
  const scalar_t* weight_t = nullptr;  // [N_in, N_out], for dx on the producer's active set
  const int64_t* prev_ptr = nullptr;   // producer's active set (CSR over b*T + t), or null
  const int32_t* prev_idx = nullptr;
  const int32_t* rst_bits = nullptr;   // reset to zero: R[t] bits [T, B, ceil(N_out/32)], or null
  // outputs, null when not wanted
  acc_t* dx = nullptr;       // [T, B, N_in] zero-initialised, written at the producer's entries
  acc_t* g_dense = nullptr;  // [T, B, N_out] zero-initialised: G for dx = G W by GEMM
  acc_t* dw_t = nullptr;     // [N_in, N_out] zero-initialised, unscaled
  acc_t* db = nullptr;       // [N_out] zero-initialised, unscaled
  scalar_t* dv = nullptr;    // [B, N_out] = alpha * G[0]
};

// The deltas of a LIF layer: dL/dS * surrogate at the active entries (act.val = surrogate).
template <typename scalar_t>
struct LifInject {
  using acc_t = at::opmath_type<scalar_t>;
  CsrView<scalar_t> act;
  const scalar_t* grad = nullptr;  // dL/dS [T, B, N_out]
  int64_t T = 0, B = 0, n_out = 0;

  __device__ __forceinline__ bool operator()(int64_t b, int64_t t, int64_t j0, int64_t jn,
                                             acc_t* G) const {
    const int64_t r = b * T + t, hi = act.ptr[r + 1];
    int64_t e = act.ptr[r];
    if (e == hi) return false;
    e = lower_bound(act.idx, e, hi, j0);
    const scalar_t* g = grad + (t * B + b) * n_out;
    bool any = false;
    for (; e < hi && int64_t(act.idx[e]) < j0 + jn; ++e) {
      const int64_t j = act.idx[e];
      G[j - j0] += static_cast<acc_t>(g[j]) * static_cast<acc_t>(act.val[e]);
      any = true;
    }
    return any;
  }
};

// The deltas of the readout: dL/dU from the time reduction (max: at argmax_t only).
template <typename scalar_t>
struct ReadoutInject {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* grad = nullptr;   // [B, N_out], or [T, B, N_out] for "none"
  const int64_t* argmax = nullptr;  // [B, N_out] for "max"
  int reduce = 0;                   // ReduceKind
  acc_t per_step = 1;               // 1/T for "mean"
  int64_t B = 0, n_out = 0;

  __device__ __forceinline__ bool operator()(int64_t b, int64_t t, int64_t j0, int64_t jn,
                                             acc_t* G) const {
    bool any = false;
    for (int64_t jj = 0; jj < jn; ++jj) {
      const int64_t k = b * n_out + j0 + jj;
      if (reduce == kReduceMax) {
        if (argmax[k] == t) {
          G[jj] += static_cast<acc_t>(grad[k]);
          any = true;
        }
      } else if (reduce == kReduceNone) {
        G[jj] += static_cast<acc_t>(grad[(t * B + b) * n_out + j0 + jj]);
        any = true;
      } else {  // sum, mean
        G[jj] += per_step * static_cast<acc_t>(grad[k]);
        any = true;
      }
    }
    return any;
  }
};

template <typename scalar_t, int kTile, typename Inject>
__global__ void trace_backward_kernel(TraceArgs<scalar_t> p, Inject inject) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t tiles = (p.n_out + kTile - 1) / kTile;
  SG_KERNEL_LOOP(k, p.B * tiles) {
    const int64_t b = k / tiles, j0 = (k % tiles) * kTile;
    const int64_t jn = p.n_out - j0 < kTile ? p.n_out - j0 : kTile;
    acc_t G[kTile], db[kTile];
    for (int jj = 0; jj < kTile; ++jj) G[jj] = db[jj] = acc_t(0);
    bool live = false;  // G is exactly zero until the first delta: skip the work before it
    if (p.g_init) {
      for (int64_t jj = 0; jj < jn; ++jj) G[jj] = static_cast<acc_t>(p.g_init[b * p.n_out + j0 + jj]);
      live = true;
    }
    const int64_t words = (p.n_out + 31) / 32;
    for (int64_t t = p.T - 1; t >= 0; --t) {
      if (live && t < p.T - 1) {
        const int32_t* cut = p.rst_bits ? p.rst_bits + ((t + 1) * p.B + b) * words : nullptr;
        for (int64_t jj = 0; jj < jn; ++jj)
          G[jj] *= cut ? math::trace_decay(p.alpha, bit_set(cut, j0 + jj), int(kResetZero)) : p.alpha;
      }
      live = inject(b, t, j0, jn, G) || live;
      if (!live) continue;
      if (p.db)
        for (int64_t jj = 0; jj < jn; ++jj) db[jj] += G[jj];
      const int64_t r = b * p.T + t;
      if (p.dw_t) {
        for (int64_t e = p.events.ptr[r]; e < p.events.ptr[r + 1]; ++e) {
          const acc_t x = static_cast<acc_t>(p.events.value(e));
          acc_t* row = p.dw_t + int64_t(p.events.idx[e]) * p.n_out + j0;
          for (int64_t jj = 0; jj < jn; ++jj) atomic_add(row + jj, x * G[jj]);
        }
      }
      if (p.g_dense) {
        acc_t* row = p.g_dense + (t * p.B + b) * p.n_out + j0;
        for (int64_t jj = 0; jj < jn; ++jj) row[jj] = G[jj];
      }
      if (p.prev_ptr) {
        for (int64_t e = p.prev_ptr[r]; e < p.prev_ptr[r + 1]; ++e) {
          const int64_t i = p.prev_idx[e];
          const scalar_t* w = p.weight_t + i * p.n_out + j0;
          acc_t s = 0;
          for (int64_t jj = 0; jj < jn; ++jj) s += G[jj] * static_cast<acc_t>(w[jj]);
          atomic_add(p.dx + (t * p.B + b) * p.n_in + i, p.scale * s);
        }
      }
    }
    if (p.dv) {
      const int32_t* cut = p.rst_bits ? p.rst_bits + b * words : nullptr;
      for (int64_t jj = 0; jj < jn; ++jj) {
        const acc_t a = cut ? math::trace_decay(p.alpha, bit_set(cut, j0 + jj), int(kResetZero)) : p.alpha;
        p.dv[b * p.n_out + j0 + jj] = static_cast<scalar_t>(a * G[jj]);
      }
    }
    if (p.db && live)
      for (int64_t jj = 0; jj < jn; ++jj) atomic_add(p.db + j0 + jj, db[jj]);
  }
}

template <typename scalar_t>
struct DwActiveArgs {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t T = 0, B = 0, n_in = 0, n_out = 0;
  acc_t alpha = 0;
  CsrView<scalar_t> events;          // input events (sorted by i within a row)
  CsrView<scalar_t> act;             // active set, val = surrogate
  const scalar_t* grad = nullptr;    // dL/dS [T, B, N_out]
  const scalar_t* g_init = nullptr;  // [B, N_out] or null
  acc_t* dw = nullptr;               // [N_out, N_in] zero-initialised
};

template <typename scalar_t, int kTile>
__global__ void dw_active_kernel(DwActiveArgs<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t tiles = (p.n_in + kTile - 1) / kTile;
  SG_KERNEL_LOOP(k, p.B * tiles) {
    const int64_t b = k / tiles, i0 = (k % tiles) * kTile;
    const int64_t in = p.n_in - i0 < kTile ? p.n_in - i0 : kTile;
    acc_t X[kTile];
    for (int ii = 0; ii < kTile; ++ii) X[ii] = acc_t(0);
    bool live = false;  // X is exactly zero until the tile's first input event
    for (int64_t t = 0; t < p.T; ++t) {
      if (live)
        for (int64_t ii = 0; ii < in; ++ii) X[ii] *= p.alpha;
      const int64_t r = b * p.T + t, hi = p.events.ptr[r + 1];
      for (int64_t e = lower_bound(p.events.idx, p.events.ptr[r], hi, i0);
           e < hi && int64_t(p.events.idx[e]) < i0 + in; ++e) {
        X[p.events.idx[e] - i0] += static_cast<acc_t>(p.events.value(e));
        live = true;
      }
      if (!live) continue;
      const scalar_t* g = p.grad + (t * p.B + b) * p.n_out;
      for (int64_t e = p.act.ptr[r]; e < p.act.ptr[r + 1]; ++e) {
        const int64_t j = p.act.idx[e];
        const acc_t delta = static_cast<acc_t>(g[j]) * static_cast<acc_t>(p.act.val[e]);
        acc_t* row = p.dw + j * p.n_in + i0;
        for (int64_t ii = 0; ii < in; ++ii) atomic_add(row + ii, delta * X[ii]);
      }
    }
    if (p.g_init && live) {
      for (int64_t j = 0; j < p.n_out; ++j) {
        const acc_t g = static_cast<acc_t>(p.g_init[b * p.n_out + j]);
        acc_t* row = p.dw + j * p.n_in + i0;
        for (int64_t ii = 0; ii < in; ++ii) atomic_add(row + ii, g * X[ii]);
      }
    }
  }
}

// Dense backward: G[t] = alpha*G[t+1] + dL/dS[t]*sg[t] at every entry, one thread per (b, j).
template <typename scalar_t>
__global__ void reverse_scan_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ sg,
                                    const scalar_t* __restrict__ g_init,
                                    const int32_t* __restrict__ rst_bits, int64_t T, int64_t B,
                                    int64_t N, at::opmath_type<scalar_t> alpha,
                                    scalar_t* __restrict__ G) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t words = (N + 31) / 32;
  SG_KERNEL_LOOP(k, B * N) {
    const int64_t b = k / N, j = k % N;
    acc_t trace = g_init ? static_cast<acc_t>(g_init[k]) : acc_t(0);
    for (int64_t t = T - 1; t >= 0; --t) {
      const int64_t at = (t * B + b) * N + j;
      acc_t a = t == T - 1 ? acc_t(1) : alpha;  // G[T-1] = dL/dV_final + delta[T-1]
      if (rst_bits && t < T - 1)
        a = math::trace_decay(a, bit_set(rst_bits + ((t + 1) * B + b) * words, j), int(kResetZero));
      trace = math::decay_add(trace, static_cast<acc_t>(grad[at]) * static_cast<acc_t>(sg[at]), a);
      G[at] = static_cast<scalar_t>(trace);
    }
  }
}

}  // namespace cuda
}  // namespace sparsegrad
