// Row compaction: turn a dense [T, B, N] quantity into a CSR over rows r = b*T + t with ascending
// column inside a row (the layout of input events and of active sets, identical to the CPU's).
//
// Each compaction is three device-wide steps, no host loop over rows or time:
//   1. a count kernel (one warp per row) writes the row's size to ptr[r + 1] (ptr[0] = 0),
//   2. an inclusive scan of ptr (at::cumsum_, a CUB scan on the GPU) turns sizes into offsets,
//   3. after reading the total (the one unavoidable device->host copy: it sizes the output),
//      a fill kernel (one warp per row) writes the row's entries at ptr[r].
//
// A warp per row: the 32 lanes read 32 consecutive elements of the row at a time (one 128-byte
// transaction for float32, where a thread per row touched a different row per lane, rows N
// elements apart), a ballot says which of them are nonzero / active, and each such lane writes
// its entry at the row's running offset plus its rank among the ballot's bits. Columns are
// visited in ascending order, so the output is the same CSR, bit for bit, as the thread-per-row
// loop and the CPU. Launch with warp_launch_shape (whole warps): every lane of a warp runs the same
// number of chunks, so the full-mask collectives have all 32 lanes.
#pragma once

#include "cuda/kernel_common.cuh"

namespace sparsegrad {
namespace cuda {

// ---------------------------------------------------------------------------------------------
// Input events: the nonzeros of x [T, B, N]; `nonbinary` counts rows holding a value other than
// 0 and 1 (the values are then stored, else they are implicitly 1).
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
__global__ void events_count_kernel(const scalar_t* __restrict__ x, int64_t T, int64_t B, int64_t N,
                                    int64_t* __restrict__ ptr, int64_t* __restrict__ nonbinary) {
  SG_WARP_LOOP(r, B * T) {
    const int64_t b = r / T, t = r % T;
    const scalar_t* row = x + (t * B + b) * N;
    int64_t count = 0;
    bool other = false;
    for (int64_t i0 = 0; i0 < N; i0 += kWarp) {
      const int64_t i = i0 + lane_id();
      const scalar_t v = i < N ? row[i] : scalar_t(0);
      count += __popc(__ballot_sync(kFullMask, v != scalar_t(0)));
      other |= (v != scalar_t(0)) && (v != scalar_t(1));
    }
    other = __any_sync(kFullMask, other);
    if (lane_id() == 0) {
      ptr[r + 1] = count;
      if (other) atomic_add_count(nonbinary, 1);
    }
  }
}

template <typename scalar_t>
__global__ void events_fill_kernel(const scalar_t* __restrict__ x, int64_t T, int64_t B, int64_t N,
                                   const int64_t* __restrict__ ptr, int32_t* __restrict__ idx,
                                   scalar_t* __restrict__ val /* null when x is binary */) {
  SG_WARP_LOOP(r, B * T) {
    const int64_t b = r / T, t = r % T;
    const scalar_t* row = x + (t * B + b) * N;
    int64_t e = ptr[r];
    for (int64_t i0 = 0; i0 < N; i0 += kWarp) {
      const int64_t i = i0 + lane_id();
      const scalar_t v = i < N ? row[i] : scalar_t(0);
      const unsigned nz = __ballot_sync(kFullMask, v != scalar_t(0));
      if (v != scalar_t(0)) {
        const int64_t at = e + __popc(nz & lanes_below());
        idx[at] = static_cast<int32_t>(i);
        if (val) val[at] = v;
      }
      e += __popc(nz);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Active set: entries with |V - threshold| < b_th, from the membrane potentials v [T, B, N] that
// the forward kernel left in a scratch buffer; the fill also writes the surrogate at each entry.
// ---------------------------------------------------------------------------------------------
template <typename acc_t>
__global__ void active_count_kernel(const acc_t* __restrict__ v, int64_t T, int64_t B, int64_t N,
                                    acc_t threshold, acc_t b_th, int64_t* __restrict__ ptr) {
  SG_WARP_LOOP(r, B * T) {
    const int64_t b = r / T, t = r % T;
    const acc_t* row = v + (t * B + b) * N;
    int64_t count = 0;
    for (int64_t j0 = 0; j0 < N; j0 += kWarp) {
      const int64_t j = j0 + lane_id();
      const bool active = j < N && math::is_active(row[j], threshold, b_th);
      count += __popc(__ballot_sync(kFullMask, active));
    }
    if (lane_id() == 0) ptr[r + 1] = count;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void active_fill_kernel(const acc_t* __restrict__ v, int64_t T, int64_t B, int64_t N,
                                   acc_t threshold, acc_t b_th, acc_t slope, int surrogate,
                                   const int64_t* __restrict__ ptr, int32_t* __restrict__ idx,
                                   scalar_t* __restrict__ sg) {
  SG_WARP_LOOP(r, B * T) {
    const int64_t b = r / T, t = r % T;
    const acc_t* row = v + (t * B + b) * N;
    int64_t e = ptr[r];
    for (int64_t j0 = 0; j0 < N; j0 += kWarp) {
      const int64_t j = j0 + lane_id();
      const bool active = j < N && math::is_active(row[j], threshold, b_th);
      const unsigned mask = __ballot_sync(kFullMask, active);
      if (active) {
        const int64_t at = e + __popc(mask & lanes_below());
        idx[at] = static_cast<int32_t>(j);
        sg[at] = static_cast<scalar_t>(math::surrogate(row[j], threshold, slope, surrogate));
      }
      e += __popc(mask);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Reset bits (reset to zero): word w of row (t, b) packs S[t-1, b, 32w .. 32w+31] (s_init at t = 0),
// one warp per word: lane l reads neuron 32w + l (coalesced) and the ballot is the word, so no two
// warps write the same word and no atomics are needed.
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
__global__ void reset_bits_kernel(const scalar_t* __restrict__ spikes, const scalar_t* __restrict__ s_init,
                                  int64_t T, int64_t B, int64_t N, int32_t* __restrict__ bits) {
  const int64_t words = (N + 31) / 32;
  SG_WARP_LOOP(k, T * B * words) {
    const int64_t w = k % words, tb = k / words, t = tb / B, b = tb % B;
    const scalar_t* s = t == 0 ? (s_init ? s_init + b * N : nullptr) : spikes + ((t - 1) * B + b) * N;
    const int64_t j = kWarp * w + lane_id();
    const unsigned word = __ballot_sync(kFullMask, s != nullptr && j < N && s[j] > scalar_t(0));
    if (lane_id() == 0) bits[k] = static_cast<int32_t>(word);
  }
}

}  // namespace cuda
}  // namespace sparsegrad
