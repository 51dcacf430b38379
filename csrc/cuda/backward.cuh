// Backward kernels (host sequence: host_ops.h; route choice: gpu_routes.h; docs/cuda.md).
//
// Every kernel here writes each output element from exactly one thread, which sums its terms in a
// fixed order: no float atomics, no shared memory, no barriers, no warp collectives. So the
// results are bit-for-bit the same from run to run, whatever the launch geometry and the order in
// which threads run (the emulation tests run forward, reverse and shuffled orders).
//
// The gradient trace over the output neurons, G[t] = d[t+1] * G[t+1] + delta[t] (d = alpha, or 0
// across a reset-to-zero spike; G[T-1] starts from dL/dV_final), is materialised densely as
// G [T, B, N_out] in the accumulation type: on a GPU that costs a few microseconds of bandwidth at
// the SHD layer (DESIGN.md §6) and turns every gradient into a reduction with one writer per
// element:
//   - reverse_trace_kernel: one thread per (b, j) scans t = T-1..0 in place (the buffer holds the
//     deltas on entry), keeping its db partial sum and writing dL/dV_init;
//   - dW: segment_sum_kernel over entries regrouped by column (csr.cuh), or a cuBLAS GEMM;
//   - restricted dx: entry_dot_kernel, one dot product G[t,b,:] . W^T[i,:] per producer entry;
//     full dx: a cuBLAS GEMM;
//   - db: column_sum_kernel over the per-batch partial sums.
#pragma once

#include <cmath>

#include "cuda/csr.cuh"
#include "cuda/kernel_common.cuh"

namespace sparsegrad {
namespace cuda {

// The decay of the trace between t and t-1 reads the reset bit R[t] = S[t-1] (rst_bits, only for
// reset-to-zero; rst == null: no reset cuts the trace).
template <typename acc_t>
struct TraceDecay {
  acc_t alpha = 0;
  int reset = kResetSubtract;
  const int32_t* rst = nullptr;  // [T, B, words] bits, or null
  int64_t B = 0, words = 0;

  // dV[t]/dV[t-1] (t = 0: dV[0]/dV_init)
  __device__ __forceinline__ acc_t operator()(int64_t t, int64_t b, int64_t j) const {
    return math::trace_decay(alpha, rst != nullptr && bit_set(rst + (t * B + b) * words, j), reset);
  }
};

template <typename scalar_t>
struct ScanArgs {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t T = 0, B = 0, n = 0;
  TraceDecay<acc_t> decay;
  const scalar_t* g_init = nullptr;  // [B, N] dL/dV_final, or null
  acc_t* G = nullptr;                // [T, B, N]: G at every entry (may hold the deltas on entry)
  acc_t* db_parts = nullptr;         // [B, N]: sum over t of G, or null
  scalar_t* dv = nullptr;            // [B, N]: dL/dV_init, or null
};

// Steps per block of the reverse scan: a thread first issues the loads of kScanSteps steps
// (deltas and reset bits do not depend on G), then runs their recurrence. With one thread per
// (b, j) there are few threads (12800 at the SHD layer), so the loads of one thread must overlap
// for the scan to approach the memory bandwidth; the arithmetic and its order are unchanged.
constexpr int kScanSteps = 16;

// inject(at, b, t, j) = delta[t, b, j] (at = (t*B + b)*N + j), read before G[at] is written.
template <typename scalar_t, typename Inject>
__global__ void reverse_trace_kernel(ScanArgs<scalar_t> a, Inject inject) {
  using acc_t = at::opmath_type<scalar_t>;
  SG_KERNEL_LOOP(k, a.B * a.n) {
    const int64_t b = k / a.n, j = k % a.n;
    acc_t G = a.g_init ? static_cast<acc_t>(a.g_init[k]) : acc_t(0);
    acc_t db = 0;
    for (int64_t top = a.T - 1; top >= 0; top -= kScanSteps) {  // steps top, top-1, ... (>= 0)
      acc_t delta[kScanSteps], decay[kScanSteps];
      SG_DEVICE_UNROLL
      for (int s = 0; s < kScanSteps; ++s) {
        const int64_t t = top - s;
        if (t >= 0) {
          delta[s] = inject((t * a.B + b) * a.n + j, b, t, j);
          decay[s] = t == a.T - 1 ? acc_t(1) : a.decay(t + 1, b, j);  // G[T-1] = dL/dV_final + delta
        }
      }
      SG_DEVICE_UNROLL
      for (int s = 0; s < kScanSteps; ++s) {
        const int64_t t = top - s;
        if (t >= 0) {
          G = math::decay_add(G, delta[s], decay[s]);
          if (a.G) a.G[(t * a.B + b) * a.n + j] = G;
          db += G;
        }
      }
    }
    if (a.dv) a.dv[k] = static_cast<scalar_t>(a.T > 0 ? a.decay(0, b, j) * G : G);
    if (a.db_parts) a.db_parts[k] = db;
  }
}

// The LIF sparse backward: the buffer holds delta = dL/dS * surrogate at the active entries (put
// there by scatter_delta_kernel) and zero elsewhere.
template <typename acc_t>
struct BufferInject {
  const acc_t* delta = nullptr;
  __device__ __forceinline__ acc_t operator()(int64_t at, int64_t, int64_t, int64_t) const { return delta[at]; }
};

// The dense backward: delta = dL/dS * surrogate everywhere.
template <typename scalar_t>
struct DenseInject {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* grad = nullptr;
  const scalar_t* sg = nullptr;
  __device__ __forceinline__ acc_t operator()(int64_t at, int64_t, int64_t, int64_t) const {
    return static_cast<acc_t>(grad[at]) * static_cast<acc_t>(sg[at]);
  }
};

// The readout: dL/dU from the time reduction (max: at argmax_t only; an argmax_t outside [0, T)
// never matches and raises the error flag).
template <typename scalar_t>
struct ReadoutInject {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* grad = nullptr;   // [B, N_out], or [T, B, N_out] for "none"
  const int64_t* argmax = nullptr;  // [B, N_out] for "max"
  int reduce = kReduceMax;
  acc_t per_step = 1;               // 1/T for "mean"
  int64_t T = 0, n_out = 0;
  int32_t* flag = nullptr;

  __device__ __forceinline__ acc_t operator()(int64_t at, int64_t b, int64_t t, int64_t j) const {
    const int64_t k = b * n_out + j;
    switch (reduce) {
      case kReduceMax:
        if (t == T - 1 && (argmax[k] < 0 || argmax[k] >= T)) raise_flag(flag, kFlagArgmax);
        return argmax[k] == t ? static_cast<acc_t>(grad[k]) : acc_t(0);
      case kReduceNone:
        return static_cast<acc_t>(grad[at]);
      default:  // sum, mean
        return per_step * static_cast<acc_t>(grad[k]);
    }
  }
};

// delta at the active entries into the zero-filled buffer [T, B, N_out] (distinct entries: one
// writer each). row: csr_expand_kernel's rows (-1: skipped).
template <typename scalar_t>
__global__ void scatter_delta_kernel(const int64_t* __restrict__ row, const int32_t* __restrict__ idx,
                                     const scalar_t* __restrict__ sg, int64_t n,
                                     const scalar_t* __restrict__ grad, int64_t T, int64_t B,
                                     int64_t n_out, at::opmath_type<scalar_t>* __restrict__ delta) {
  using acc_t = at::opmath_type<scalar_t>;
  SG_KERNEL_LOOP(e, n) {
    const int64_t r = row[e];
    if (r < 0) continue;
    const int64_t at = ((r % T) * B + r / T) * n_out + idx[e];
    delta[at] = static_cast<acc_t>(grad[at]) * static_cast<acc_t>(sg[e]);
  }
}

// The input events into a zero-filled dense [T, B, N_in] (for the GEMM and input-trace routes).
template <typename scalar_t>
__global__ void scatter_events_kernel(const int64_t* __restrict__ row, const int32_t* __restrict__ idx,
                                      const scalar_t* __restrict__ val /* null: binary */, int64_t n,
                                      int64_t T, int64_t B, int64_t n_in,
                                      at::opmath_type<scalar_t>* __restrict__ x) {
  using acc_t = at::opmath_type<scalar_t>;
  SG_KERNEL_LOOP(e, n) {
    const int64_t r = row[e];
    if (r < 0) continue;
    x[((r % T) * B + r / T) * n_in + idx[e]] = val ? static_cast<acc_t>(val[e]) : acc_t(1);
  }
}

// In place: X[t] = alpha * X[t-1] + x[t], the input trace (one thread per (b, i), t ascending,
// loads issued kScanSteps steps at a time as in the reverse scan).
template <typename acc_t>
__global__ void input_trace_kernel(acc_t* __restrict__ x, int64_t T, int64_t B, int64_t n_in, acc_t alpha) {
  SG_KERNEL_LOOP(k, B * n_in) {
    const int64_t b = k / n_in, i = k % n_in;
    acc_t trace = 0;
    for (int64_t t0 = 0; t0 < T; t0 += kScanSteps) {
      acc_t v[kScanSteps];
      SG_DEVICE_UNROLL
      for (int s = 0; s < kScanSteps; ++s)
        if (t0 + s < T) v[s] = x[((t0 + s) * B + b) * n_in + i];
      SG_DEVICE_UNROLL
      for (int s = 0; s < kScanSteps; ++s) {
        if (t0 + s < T) {
          trace = math::decay_add(trace, v[s], alpha);
          x[((t0 + s) * B + b) * n_in + i] = trace;
        }
      }
    }
  }
}

// Weights of the regrouped entries (segment_entries_kernel): the event value, or the delta.
template <typename scalar_t>
struct EventWeight {
  const scalar_t* val = nullptr;  // null: binary input
  __device__ __forceinline__ at::opmath_type<scalar_t> operator()(int64_t e, int64_t, int64_t) const {
    return val ? static_cast<at::opmath_type<scalar_t>>(val[e]) : at::opmath_type<scalar_t>(1);
  }
};

template <typename scalar_t>
struct DeltaWeight {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* grad = nullptr;  // dL/dS [T, B, N_out]
  const scalar_t* sg = nullptr;    // surrogate per active entry
  const int32_t* idx = nullptr;    // neuron per active entry
  int64_t B = 0, n_out = 0;
  __device__ __forceinline__ acc_t operator()(int64_t e, int64_t t, int64_t b) const {
    return static_cast<acc_t>(grad[(t * B + b) * n_out + idx[e]]) * static_cast<acc_t>(sg[e]);
  }
};

// out[c, k] = scale * sum over the entries p of segment c (in order) of w[p] * D[drow[p], k].
// One thread per (c, k), k fastest: a warp reads 32 consecutive elements of one row of D while
// the segment's (drow, w) are broadcasts. The output strides let dW be written as [N_out, N_in]
// whichever side the segments are on.
template <typename acc_t>
struct SegmentArgs {
  int64_t n_seg = 0, K = 0;
  const int64_t* seg_ptr = nullptr;  // [n_seg + 1]
  const int64_t* drow = nullptr;     // [entries], -1: skipped
  const acc_t* w = nullptr;          // [entries]
  const acc_t* D = nullptr;          // [rows, K]
  acc_t* out = nullptr;
  int64_t out_seg_stride = 0, out_k_stride = 1;
  acc_t scale = 1;
};

// Entries per block of a segment: their (row, weight) pairs, then their elements of D, are loaded
// before they are added (in entry order), so that a thread has several gathers in flight.
constexpr int kSegmentBlock = 8;

template <typename acc_t>
__global__ void segment_sum_kernel(SegmentArgs<acc_t> a) {
  SG_KERNEL_LOOP(q, a.n_seg * a.K) {
    const int64_t c = q / a.K, k = q % a.K;
    const int64_t end = a.seg_ptr[c + 1];
    acc_t s = 0;
    for (int64_t p = a.seg_ptr[c]; p < end; p += kSegmentBlock) {
      int64_t r[kSegmentBlock];
      acc_t w[kSegmentBlock], d[kSegmentBlock];
      SG_DEVICE_UNROLL
      for (int u = 0; u < kSegmentBlock; ++u) {
        r[u] = p + u < end ? a.drow[p + u] : -1;
        w[u] = p + u < end ? a.w[p + u] : acc_t(0);
      }
      SG_DEVICE_UNROLL
      for (int u = 0; u < kSegmentBlock; ++u) d[u] = r[u] >= 0 ? a.D[r[u] * a.K + k] : acc_t(0);
      SG_DEVICE_UNROLL
      for (int u = 0; u < kSegmentBlock; ++u)
        if (r[u] >= 0) s += w[u] * d[u];
    }
    a.out[c * a.out_seg_stride + k * a.out_k_stride] = a.scale * s;
  }
}

// dx[t, b, i] = scale * G[t, b, :] . W^T[i, :] at each producer entry (t, b, i): one thread per
// entry, j ascending. dx is zero-filled elsewhere.
template <typename scalar_t>
__global__ void entry_dot_kernel(const int64_t* __restrict__ row, const int32_t* __restrict__ idx,
                                 int64_t n, int64_t T, int64_t B, int64_t n_in, int64_t n_out,
                                 const at::opmath_type<scalar_t>* __restrict__ G,
                                 const scalar_t* __restrict__ weight_t, at::opmath_type<scalar_t> scale,
                                 at::opmath_type<scalar_t>* __restrict__ dx) {
  using acc_t = at::opmath_type<scalar_t>;
  SG_KERNEL_LOOP(e, n) {
    const int64_t r = row[e];
    if (r < 0) continue;
    const int64_t tb = (r % T) * B + r / T, i = idx[e];
    const acc_t* g = G + tb * n_out;
    const scalar_t* w = weight_t + i * n_out;
    acc_t s = 0;
    for (int64_t j = 0; j < n_out; ++j) s += g[j] * static_cast<acc_t>(w[j]);
    dx[tb * n_in + i] = scale * s;
  }
}

// out[c] = scale * sum over r (ascending) of parts[r, c]: db from the per-batch partial sums.
template <typename scalar_t>
__global__ void column_sum_kernel(const at::opmath_type<scalar_t>* __restrict__ parts, int64_t rows,
                                  int64_t cols, at::opmath_type<scalar_t> scale, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  SG_KERNEL_LOOP(c, cols) {
    acc_t s = 0;
    for (int64_t r = 0; r < rows; ++r) s += parts[r * cols + c];
    out[c] = static_cast<scalar_t>(scale * s);
  }
}

// When the error flag is set (inconsistent compact tensors: csr.cuh), every gradient becomes NaN,
// so that a wrong call cannot go unnoticed on a GPU, where reading the flag would cost a host
// synchronisation. Launched with a few blocks whatever the sizes: it returns at once when the
// flag is clear.
constexpr int kPoisonOutputs = 10;  // the most gradients of one op (rlif_param_backward_sparse)

template <typename scalar_t>
struct PoisonArgs {
  scalar_t* out[kPoisonOutputs] = {};
  int64_t n[kPoisonOutputs] = {};
  const int32_t* flag = nullptr;
};

template <typename scalar_t>
__global__ void poison_kernel(PoisonArgs<scalar_t> a, int64_t total) {
  if (*a.flag == 0) return;
  SG_KERNEL_LOOP(k, total) {
    int64_t q = k;
    for (int o = 0; o < kPoisonOutputs; ++o) {
      if (q < a.n[o]) {
        a.out[o][q] = static_cast<scalar_t>(NAN);
        break;
      }
      q -= a.n[o];
    }
  }
}

}  // namespace cuda
}  // namespace sparsegrad
