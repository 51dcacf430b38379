// Row compaction: turn a dense [T, B, N] quantity into a CSR over rows r = b*T + t with ascending
// column inside a row (the layout of input events and of active sets, identical to the CPU's).
//
// Each compaction is three device-wide steps, no host loop over rows or time:
//   1. a count kernel (one thread per row) writes the row's size to ptr[r + 1] (ptr[0] = 0),
//   2. an inclusive scan of ptr (at::cumsum_, a CUB scan on the GPU) turns sizes into offsets,
//   3. after reading the total (the one unavoidable device->host copy: it sizes the output),
//      a fill kernel (one thread per row) writes the row's entries at ptr[r].
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
  SG_KERNEL_LOOP(r, B * T) {
    const int64_t b = r / T, t = r % T;
    const scalar_t* row = x + (t * B + b) * N;
    int64_t count = 0;
    bool other = false;
    for (int64_t i = 0; i < N; ++i) {
      const scalar_t v = row[i];
      count += v != scalar_t(0);
      other |= (v != scalar_t(0)) && (v != scalar_t(1));
    }
    ptr[r + 1] = count;
    if (other) atomic_add_count(nonbinary, 1);
  }
}

template <typename scalar_t>
__global__ void events_fill_kernel(const scalar_t* __restrict__ x, int64_t T, int64_t B, int64_t N,
                                   const int64_t* __restrict__ ptr, int32_t* __restrict__ idx,
                                   scalar_t* __restrict__ val /* null when x is binary */) {
  SG_KERNEL_LOOP(r, B * T) {
    const int64_t b = r / T, t = r % T;
    const scalar_t* row = x + (t * B + b) * N;
    int64_t e = ptr[r];
    for (int64_t i = 0; i < N; ++i) {
      const scalar_t v = row[i];
      if (v != scalar_t(0)) {
        idx[e] = static_cast<int32_t>(i);
        if (val) val[e] = v;
        ++e;
      }
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
  SG_KERNEL_LOOP(r, B * T) {
    const int64_t b = r / T, t = r % T;
    const acc_t* row = v + (t * B + b) * N;
    int64_t count = 0;
    for (int64_t j = 0; j < N; ++j) count += math::is_active(row[j], threshold, b_th);
    ptr[r + 1] = count;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void active_fill_kernel(const acc_t* __restrict__ v, int64_t T, int64_t B, int64_t N,
                                   acc_t threshold, acc_t b_th, acc_t slope, int surrogate,
                                   const int64_t* __restrict__ ptr, int32_t* __restrict__ idx,
                                   scalar_t* __restrict__ sg) {
  SG_KERNEL_LOOP(r, B * T) {
    const int64_t b = r / T, t = r % T;
    const acc_t* row = v + (t * B + b) * N;
    int64_t e = ptr[r];
    for (int64_t j = 0; j < N; ++j) {
      if (math::is_active(row[j], threshold, b_th)) {
        idx[e] = static_cast<int32_t>(j);
        sg[e] = static_cast<scalar_t>(math::surrogate(row[j], threshold, slope, surrogate));
        ++e;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Reset bits (reset to zero): word w of row (t, b) packs S[t-1, b, 32w .. 32w+31] (s_init at t = 0),
// one thread per word, so no two threads write the same word.
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
__global__ void reset_bits_kernel(const scalar_t* __restrict__ spikes, const scalar_t* __restrict__ s_init,
                                  int64_t T, int64_t B, int64_t N, int32_t* __restrict__ bits) {
  const int64_t words = (N + 31) / 32;
  SG_KERNEL_LOOP(k, T * B * words) {
    const int64_t w = k % words, tb = k / words, t = tb / B, b = tb % B;
    const scalar_t* s = t == 0 ? (s_init ? s_init + b * N : nullptr) : spikes + ((t - 1) * B + b) * N;
    uint32_t word = 0;
    if (s) {
      for (int64_t l = 0; l < 32 && 32 * w + l < N; ++l)
        word |= static_cast<uint32_t>(s[32 * w + l] > scalar_t(0)) << l;
    }
    bits[k] = static_cast<int32_t>(word);
  }
}

}  // namespace cuda
}  // namespace sparsegrad
