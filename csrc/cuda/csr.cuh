// Kernels that prepare the compact tensors a backward receives (CSRs over rows r = b*T + t with
// ascending column inside a row: active sets, input events, the producer's active set).
//
// They are also the bound checks of those tensors. A backward trusts nothing it is given: every
// entry's row is found from the offsets (a binary search that stays inside the offsets whatever
// they hold), and an entry whose row or column is out of range is marked row = -1 and skipped by
// every later kernel, so inconsistent tensors passed to the ops directly never make a kernel read
// or write out of bounds. The first problem of each kind sets a bit of an int32 error flag
// (integer atomicOr: its value does not depend on thread order); the host code turns a set flag
// into NaN gradients on the GPU (no host synchronisation) and into an exception in the emulation.
#pragma once

#include "cuda/kernel_common.cuh"

namespace sparsegrad {
namespace cuda {

// Bits of the error flag: per CSR c (0: active set, 1: input events, 2: producer's set),
// bit 2c = the row counts do not add up to the index array, bit 2c + 1 = an index out of range
// or not ascending within its row; kFlagArgmax = an argmax_t outside [0, T).
constexpr int kFlagArgmax = 1 << 6;
// kFlagPoolIdx = an entry of max pooling's winner offsets outside [0, pool_k**2) (conv.cuh).
constexpr int kFlagPoolIdx = 1 << 7;

__device__ __forceinline__ int csr_count_bit(int csr) { return 1 << (2 * csr); }
__device__ __forceinline__ int csr_index_bit(int csr) { return 1 << (2 * csr + 1); }

__device__ __forceinline__ void raise_flag(int32_t* flag, int bit) {
  atomicOr(reinterpret_cast<unsigned int*>(flag), static_cast<unsigned int>(bit));
}

// Offsets off [R+1] of n entries: off[0] = 0, non-decreasing, off[R] = n (one thread per row).
// (Templates over the offset type, int64_t, so that every kernel is a template: any number of
// translation units may include this header.)
template <typename offset_t>
__global__ void csr_check_rows_kernel(const offset_t* __restrict__ off, int64_t R, int64_t n,
                                      int32_t* __restrict__ flag, int csr) {
  SG_KERNEL_LOOP(r, R) {
    const int64_t lo = int64_t(off[r]), hi = int64_t(off[r + 1]);
    const bool bad = lo < 0 || hi < lo || hi > n || (r == 0 && lo != 0) || (r == R - 1 && hi != n);
    if (bad) raise_flag(flag, csr_count_bit(csr));
  }
}

// row[e] = the row r of entry e (off[r] <= e < off[r + 1]), or -1 when the entry is unusable:
// outside every row, or its column idx[e] outside [0, n_cols). Columns must ascend strictly
// within a row (the layout the forward makes); a violation is flagged (the entry is kept: it is in
// range, so nothing reads out of bounds, but its result is unspecified).
template <typename offset_t>
__global__ void csr_expand_kernel(const offset_t* __restrict__ off, int64_t R,
                                  const int32_t* __restrict__ idx, int64_t n, int64_t n_cols,
                                  int64_t* __restrict__ row, int32_t* __restrict__ flag, int csr) {
  SG_KERNEL_LOOP(e, n) {
    // last r in [0, R) with off[r] <= e (R > 0 whenever n > 0: the host checks it)
    int64_t lo = 0, hi = R;
    while (hi - lo > 1) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (int64_t(off[mid]) <= e) lo = mid;
      else hi = mid;
    }
    const int64_t r = lo;
    const int64_t begin = int64_t(off[r]), end = int64_t(off[r + 1]);
    const int64_t col = idx[e];
    if (!(begin <= e && e < end)) {
      raise_flag(flag, csr_count_bit(csr));
      row[e] = -1;
    } else if (col < 0 || col >= n_cols) {
      raise_flag(flag, csr_index_bit(csr));
      row[e] = -1;
    } else {
      // (begin may be negative in a corrupted row pointer: idx[e - 1] only inside the row)
      if (e > begin && begin >= 0 && int64_t(idx[e - 1]) >= col) raise_flag(flag, csr_index_bit(csr));
      row[e] = r;
    }
  }
}

// seg_ptr[c] = first position p with keys[p] >= c, for c in [0, n_cols] (keys sorted ascending):
// the bounds of the segments of a CSR regrouped by column. Keys outside [0, n_cols) fall outside
// every segment. One thread per bound: each is written once.
template <typename offset_t>
__global__ void column_bounds_kernel(const int32_t* __restrict__ keys, int64_t n, int64_t n_cols,
                                     offset_t* __restrict__ seg_ptr) {
  SG_KERNEL_LOOP(c, n_cols + 1) seg_ptr[c] = lower_bound(keys, 0, n, c);
}

// For each position p of the regrouped order (perm: stable sort of the columns), the dense row
// t*B + b that the entry reads from, and its weight (the event value, or the delta): one thread
// per position, so the segment sums below read both contiguously.
template <typename acc_t, typename Weight>
__global__ void segment_entries_kernel(const int64_t* __restrict__ perm, int64_t n,
                                       const int64_t* __restrict__ row, int64_t T, int64_t B,
                                       Weight weight, int64_t* __restrict__ drow,
                                       acc_t* __restrict__ w) {
  SG_KERNEL_LOOP(p, n) {
    const int64_t e = perm[p], r = row[e];
    if (r < 0) {
      drow[p] = -1;
      w[p] = acc_t(0);
      continue;
    }
    const int64_t b = r / T, t = r % T;
    drow[p] = t * B + b;
    w[p] = weight(e, t, b);
  }
}

}  // namespace cuda
}  // namespace sparsegrad
