// Forward kernels: fused LIF layer and leaky-integrator readout. One thread per (b, j) walks the
// time steps with its state in registers; consecutive threads are consecutive j, so the reads of
// the input current and the writes of the spikes are coalesced.
//
// The walk is a chain of T dependent steps, but the input current of a step does not depend on
// the state, so the walks load the currents of kWalkAhead steps before they integrate them: from a
// dense current (the GEMM's, or the event currents precomputed by event_current_kernel) those are
// kWalkAhead independent loads in flight per thread instead of one; from the events, each step's
// row start is the previous step's row end and the next row pointer is loaded a step ahead
// (CurrentStream). The same additions in the same order: the results are bit-identical to a walk
// that loads and integrates in turn. The host launches the walks with walk_launch_shape (smaller
// blocks at small B*N, so that more SMs take part) in whole warps, and precomputes the event
// currents with T*B*N threads when the walk has too few threads to hide latency
// (split_event_current in kernel_common.cuh).
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
    const int64_t r = b * T + t;
    return event_sum(events.ptr[r], events.ptr[r + 1], j);
  }

  // The event path's current from the events [e, e_end) of one row.
  __device__ __forceinline__ acc_t event_sum(int64_t e, int64_t e_end, int64_t j) const {
    acc_t cur = bias ? static_cast<acc_t>(bias[j]) : acc_t(0);
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

// The currents of one (b, j) for t = 0, 1, ..., T-1, one per next(). Rows b*T + t of the events
// are consecutive in t, so a step's row start is the previous step's row end and the row pointer
// of the step after is loaded one step ahead: the event path's chain of dependent loads per step
// is event index -> weight, not row pointer -> event index -> weight.
template <typename scalar_t>
struct CurrentStream {
  using acc_t = at::opmath_type<scalar_t>;
  const InputCurrent<scalar_t> c;  // a copy: its fields become registers, not a kernel-parameter address
  const int64_t b, j;
  int64_t t = 0, lo = 0, hi = 0;

  __device__ __forceinline__ CurrentStream(const InputCurrent<scalar_t>& c_, int64_t b_, int64_t j_)
      : c(c_), b(b_), j(j_) {
    if (!c.dense && c.T > 0) {
      lo = c.events.ptr[b * c.T];
      hi = c.events.ptr[b * c.T + 1];
    }
  }

  __device__ __forceinline__ acc_t next() {
    if (c.dense) return static_cast<acc_t>(c.dense[(t++ * c.B + b) * c.n_out + j]);
    const int64_t hi_next = t + 1 < c.T ? c.events.ptr[b * c.T + t + 2] : hi;  // a step ahead
    const acc_t cur = c.event_sum(lo, hi, j);
    lo = hi;
    hi = hi_next;
    ++t;
    return cur;
  }
};

// The event path's currents of every (t, b, j) at once, one thread each (j fastest: coalesced
// weight reads and writes), into a [T, B, N_out] buffer the walk then reads as a dense current.
// The same sums as InputCurrent makes inside the walk, stored in the accumulation type.
template <typename scalar_t>
__global__ void event_current_kernel(InputCurrent<scalar_t> c, scalar_t* __restrict__ out) {
  SG_KERNEL_LOOP(k, c.T * c.B * c.n_out) {
    const int64_t j = k % c.n_out, tb = k / c.n_out, t = tb / c.B, b = tb % c.B;
    out[k] = static_cast<scalar_t>(c(b, t, j));
  }
}

constexpr int kWalkAhead = 8;  // steps whose currents a walk loads before integrating them

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
  int64_t* spike_partial = nullptr;  // one int64 per block: the block's spike count (the host sums
                                     // them: no same-address atomics)
};

// v_trace may alias current.dense (same element, same thread, read before written: a chunk's
// currents are all loaded before any of its steps writes V).
// Every thread of every block must reach the block_sum after the loop: launch in whole warps.
template <typename scalar_t>
__global__ void lif_forward_kernel(LifForwardArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t fired = 0;
  SG_KERNEL_LOOP(k, a.B * a.n_out) {
    const int64_t b = k / a.n_out, j = k % a.n_out;
    acc_t v = a.v_init ? static_cast<acc_t>(a.v_init[k]) : acc_t(0);
    acc_t s = a.s_init ? static_cast<acc_t>(a.s_init[k]) : acc_t(0);
    CurrentStream<scalar_t> in(a.current, b, j);
    for (int64_t t0 = 0; t0 < a.T; t0 += kWalkAhead) {
      const int64_t n = a.T - t0 < kWalkAhead ? a.T - t0 : kWalkAhead;
      acc_t cur[kWalkAhead];  // loaded first: independent of v
      SG_DEVICE_UNROLL
      for (int q = 0; q < kWalkAhead; ++q) cur[q] = q < n ? in.next() : acc_t(0);
      SG_DEVICE_UNROLL
      for (int q = 0; q < kWalkAhead; ++q) {
        if (q >= n) break;
        const int64_t at = ((t0 + q) * a.B + b) * a.n_out + j;
        v = math::integrate(v, cur[q], s, a.alpha, a.threshold, a.reset);
        s = math::fire(v, a.threshold);
        a.spikes[at] = static_cast<scalar_t>(s);
        fired += s > acc_t(0);
        if (a.v_trace) a.v_trace[at] = v;
        if (a.sg_dense)
          a.sg_dense[at] = static_cast<scalar_t>(math::surrogate(v, a.threshold, a.slope, a.surrogate));
      }
    }
    a.v_final[k] = static_cast<scalar_t>(v);
  }
  // One partial count per block instead of one same-address 64-bit atomic per thread.
  fired = block_sum(fired);
  if (thread_in_block() == 0) a.spike_partial[block_index()] = fired;
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
    CurrentStream<scalar_t> in(a.current, b, j);
    for (int64_t t0 = 0; t0 < a.T; t0 += kWalkAhead) {
      const int64_t n = a.T - t0 < kWalkAhead ? a.T - t0 : kWalkAhead;
      acc_t cur[kWalkAhead];  // see the top of the file
      SG_DEVICE_UNROLL
      for (int q = 0; q < kWalkAhead; ++q) cur[q] = q < n ? in.next() : acc_t(0);
      SG_DEVICE_UNROLL
      for (int q = 0; q < kWalkAhead; ++q) {
        if (q >= n) break;
        const int64_t t = t0 + q;
        u = math::leaky_integrate(u, cur[q], a.alpha);
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
    }
    if (a.reduce == kReduceNone) continue;
    a.out[k] = static_cast<scalar_t>(a.reduce == kReduceMean ? acc / acc_t(a.T) : acc);
    if (a.argmax) a.argmax[k] = arg;
  }
}

}  // namespace cuda
}  // namespace sparsegrad
