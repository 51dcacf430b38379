// Helpers shared by the CPU kernels: compact input events, input currents,
// fixed batch chunking (deterministic reductions) and small vector loops.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "lif_math.h"
#include "op_checks.h"

namespace sparsegrad {
namespace cpu {

// ------------------------------------------------------------------------------------------
// Small loops over contiguous rows (the hot spots of every kernel).
// ------------------------------------------------------------------------------------------
template <typename acc_t, typename in_t>
inline void axpy(int64_t n, acc_t a, const in_t* __restrict__ x, acc_t* __restrict__ y) {
  for (int64_t k = 0; k < n; ++k) y[k] += a * static_cast<acc_t>(x[k]);
}

template <typename acc_t>
inline void scale_inplace(int64_t n, acc_t a, acc_t* __restrict__ y) {
  for (int64_t k = 0; k < n; ++k) y[k] *= a;
}

// Unroll hint for loops over a compile-time number of registers (nvcc's front end, which also
// reads these headers, does not know the pragma).
#if defined(__GNUC__) && !defined(__CUDACC__)
#define SG_UNROLL_8 _Pragma("GCC unroll 8")
#define SG_UNROLL_16 _Pragma("GCC unroll 16")
#else
#define SG_UNROLL_8
#define SG_UNROLL_16
#endif

// Sum of n lanes (a vector or an array) in a fixed tree: lane l with lane l + n/2, then halving.
// n is a compile-time constant, so the whole tree stays in registers.
template <int64_t n, typename acc_t, typename V>
inline acc_t lane_tree_sum(const V& v) {
  if constexpr (n == 1) {
    return v[0];
  } else {
    acc_t half[n / 2];
    SG_UNROLL_16
    for (int64_t l = 0; l < n / 2; ++l) half[l] = v[l] + v[l + n / 2];
    return lane_tree_sum<n / 2, acc_t>(half);
  }
}

// Sum in a fixed lane order (lane l takes the elements k with k % 16 == l, then the lane tree):
// vectorises without -ffast-math and gives the same bits everywhere.
template <typename acc_t, typename in_t>
inline acc_t dot(int64_t n, const acc_t* __restrict__ x, const in_t* __restrict__ y) {
  constexpr int64_t kLanes = 16;
  typedef acc_t lanes_t __attribute__((vector_size(kLanes * sizeof(acc_t))));
  lanes_t lane{};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    lanes_t xv, yv;
    __builtin_memcpy(&xv, x + k, sizeof(xv));
    SG_UNROLL_16
    for (int64_t l = 0; l < kLanes; ++l) yv[l] = static_cast<acc_t>(y[k + l]);
    lane += xv * yv;
  }
  if (k < n) {  // lane l takes element k + l; constant lane indices keep `tail` in a register
    const int64_t rem = n - k;
    lanes_t tail{};
    SG_UNROLL_16
    for (int64_t l = 0; l < kLanes; ++l)
      if (l < rem) tail[l] = x[k + l] * static_cast<acc_t>(y[k + l]);
    lane += tail;
  }
  return lane_tree_sum<kLanes, acc_t>(lane);
}

// ------------------------------------------------------------------------------------------
// Tiles of output neurons: one SIMD register (kTileBytes) of acc_t lanes, as a GCC/Clang vector
// (lowered to whatever vector units -march allows).
// ------------------------------------------------------------------------------------------
constexpr int64_t kTileBytes = 64;

template <typename acc_t>
constexpr int64_t tile_lanes() { return kTileBytes / int64_t(sizeof(acc_t)); }

template <typename acc_t>
struct TileVec {
  typedef acc_t type __attribute__((vector_size(kTileBytes)));
};

// ------------------------------------------------------------------------------------------
// Threads only pay off with enough work per task: parallel_for runs serially when the range is
// not larger than the grain. work_per_item ~ element updates one item (batch element) costs.
// ------------------------------------------------------------------------------------------
constexpr int64_t kMinTaskWork = int64_t(1) << 16;

inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, work_per_item));
}

// ------------------------------------------------------------------------------------------
// Fixed batch chunks: reductions over the batch are summed per chunk, then chunk by chunk in
// order, so results do not depend on the number of threads.
// ------------------------------------------------------------------------------------------
constexpr int64_t kMaxChunks = 8;

struct BatchChunks {
  int64_t batch, count;
  explicit BatchChunks(int64_t B) : batch(B), count(std::max<int64_t>(1, std::min(B, kMaxChunks))) {}
  int64_t begin(int64_t c) const { return c * batch / count; }
  int64_t end(int64_t c) const { return (c + 1) * batch / count; }
};

// out[k] = scale * sum_c parts[c*n + k], summed in chunk order.
template <typename acc_t, typename out_t>
void reduce_chunks(const acc_t* parts, int64_t chunks, int64_t n, acc_t scale, out_t* out) {
  at::parallel_for(0, n, 4096, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      acc_t s = 0;
      for (int64_t c = 0; c < chunks; ++c) s += parts[c * n + k];
      out[k] = static_cast<out_t>(scale * s);
    }
  });
}

// ------------------------------------------------------------------------------------------
// Input events: the nonzeros of x [T,B,N] as a CSR over rows b*T + t.
// ------------------------------------------------------------------------------------------
struct Events {
  at::Tensor ptr;  // [B*T+1] int64 row offsets
  at::Tensor cnt;  // [B*T] int32 entries per row
  at::Tensor idx;  // [nnz] int32
  at::Tensor val;  // [nnz] values, or [0] when every element of x is 0 or 1
  int64_t nnz = 0;
  bool binary = true;
};

constexpr int64_t kScanBlock = 32;

// Bit k set iff p[k] != 0 (n <= 32); branch-free, so it compiles to vector compares.
template <typename scalar_t>
inline uint32_t nonzero_mask(const scalar_t* p, int64_t n) {
  uint32_t mask = 0;
  for (int64_t k = 0; k < n; ++k) mask |= static_cast<uint32_t>(p[k] != scalar_t(0)) << k;
  return mask;
}

// Per-row int32 counts [rows] from int64 offsets [rows + 1] (a row holds at most 2^31 - 1 entries).
inline at::Tensor counts_from_offsets(const at::Tensor& offsets) {
  const int64_t rows = offsets.numel() - 1;
  at::Tensor cnt = at::empty({rows}, offsets.options().dtype(at::kInt));
  const int64_t* o = offsets.data_ptr<int64_t>();
  int32_t* c = cnt.data_ptr<int32_t>();
  for (int64_t r = 0; r < rows; ++r) c[r] = static_cast<int32_t>(o[r + 1] - o[r]);
  return cnt;
}

// Every index of a compact tensor in [0, bound): one vectorised pass (O(entries), a few
// microseconds per 10^5 entries), so that no kernel reads or writes out of bounds when the ops are
// called directly with tensors that were not made by a sparsegrad forward.
inline void check_index_range(const at::Tensor& idx, int64_t bound, const char* op, const char* name) {
  const int64_t n = idx.numel();
  if (n == 0) return;
  const int32_t* p = idx.data_ptr<int32_t>();
  const uint32_t ubound = static_cast<uint32_t>(std::min<int64_t>(bound, int64_t(1) << 31));
  // one thread: a parallel region's barrier costs more than the pass on a busy machine
  uint32_t out = 0;
  for (int64_t e = 0; e < n; ++e) out |= static_cast<uint32_t>(static_cast<uint32_t>(p[e]) >= ubound);
  const bool bad = out != 0;
  SG_CHECK(!bad, op, name, "holds an index outside [0, ", bound,
           "): this is not a compact tensor made by a sparsegrad forward op for these shapes");
}

// Read-only view of a CSR of events (values implicit 1 when val is null).
template <typename scalar_t>
struct EventView {
  const int64_t* ptr = nullptr;
  const int32_t* idx = nullptr;
  const scalar_t* val = nullptr;
  int64_t T = 0;

  EventView() = default;
  EventView(const at::Tensor& p, const at::Tensor& i, const at::Tensor& v, int64_t steps)
      : ptr(p.data_ptr<int64_t>()), idx(i.data_ptr<int32_t>()),
        val(v.numel() > 0 ? v.data_ptr<scalar_t>() : nullptr), T(steps) {}
  int64_t begin(int64_t b, int64_t t) const { return ptr[b * T + t]; }
  int64_t end(int64_t b, int64_t t) const { return ptr[b * T + t + 1]; }
  scalar_t value(int64_t e) const { return val ? val[e] : scalar_t(1); }
};

// Event-driven input currents pay nnz*N_out; a GEMM pays T*B*N_in*N_out, each multiply-add about
// 5x cheaper (measured on the 2-core AVX-512 development machine: a 32000x700x200 GEMM against
// event rows at 2-8 % density). Below this input density the events win.
constexpr double kEventDensityMax = 0.2;

}  // namespace cpu
}  // namespace sparsegrad
