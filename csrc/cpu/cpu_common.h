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
  at::Tensor ptr;  // [B*T+1] int64 offsets (kernels)
  at::Tensor cnt;  // [B*T] int32 per-row counts (the op's output, see op_schemas.h)
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

template <typename scalar_t>
Events build_events(const at::Tensor& x) {
  const int64_t T = x.size(0), B = x.size(1), N = x.size(2);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  std::vector<std::vector<int32_t>> idx(B);
  std::vector<std::vector<scalar_t>> val(B);
  std::vector<char> nonbinary(B, 0);
  Events ev;
  ev.ptr = at::empty({B * T + 1}, x.options().dtype(at::kLong));
  int64_t* ptr = ev.ptr.data_ptr<int64_t>();
  ptr[0] = 0;
  at::parallel_for(0, B, grain_for(T * N), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t t = 0; t < T; ++t) {
        const scalar_t* row = xp + (t * B + b) * N;
        for (int64_t i0 = 0; i0 < N; i0 += kScanBlock) {
          const int64_t i1 = std::min(N, i0 + kScanBlock);
          // spikes are rare: find a block's nonzeros as a bit mask, then visit only those
          for (uint32_t mask = nonzero_mask(row + i0, i1 - i0); mask != 0; mask &= mask - 1) {
            const int64_t i = i0 + __builtin_ctz(mask);
            const scalar_t v = row[i];
            idx[b].push_back(static_cast<int32_t>(i));
            val[b].push_back(v);
            nonbinary[b] |= (v != scalar_t(1));
          }
        }
        ptr[b * T + t + 1] = static_cast<int64_t>(idx[b].size());  // local to b for now
      }
    }
  });
  std::vector<int64_t> base(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    base[b + 1] = base[b] + static_cast<int64_t>(idx[b].size());
    ev.binary = ev.binary && !nonbinary[b];
  }
  ev.nnz = base[B];
  ev.idx = at::empty({ev.nnz}, x.options().dtype(at::kInt));
  ev.val = at::empty({ev.binary ? 0 : ev.nnz}, x.options());
  int32_t* out_idx = ev.idx.data_ptr<int32_t>();
  scalar_t* out_val = ev.binary ? nullptr : ev.val.data_ptr<scalar_t>();
  at::parallel_for(0, B, grain_for(T + ev.nnz / std::max<int64_t>(B, 1)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t t = 0; t < T; ++t) ptr[b * T + t + 1] += base[b];
      std::copy(idx[b].begin(), idx[b].end(), out_idx + base[b]);
      if (out_val) std::copy(val[b].begin(), val[b].end(), out_val + base[b]);
    }
  });
  ev.cnt = counts_from_offsets(ev.ptr);
  return ev;
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

// I[t,b,:] = x[t,b,:] @ W.T + bias, either from the events (W given transposed, [N_in,N_out])
// or from a precomputed dense GEMM result [T,B,N_out].
template <typename scalar_t>
struct InputCurrent {
  using acc_t = at::opmath_type<scalar_t>;
  EventView<scalar_t> events;
  const scalar_t* weight_t = nullptr;  // [N_in, N_out]
  const scalar_t* bias = nullptr;
  const scalar_t* dense = nullptr;     // [T, B, N_out] when the GEMM path is used
  int64_t B = 0, n_out = 0;

  void fill(int64_t b, int64_t t, acc_t* cur) const {
    if (dense) {
      const scalar_t* row = dense + (t * B + b) * n_out;
      for (int64_t j = 0; j < n_out; ++j) cur[j] = static_cast<acc_t>(row[j]);
      return;
    }
    for (int64_t j = 0; j < n_out; ++j) cur[j] = bias ? static_cast<acc_t>(bias[j]) : acc_t(0);
    int64_t e = events.begin(b, t);
    const int64_t e_end = events.end(b, t);
    if (!events.val) {  // binary input: add weight rows, four at a time to save passes over cur
      for (; e + 4 <= e_end; e += 4) {
        const scalar_t* w0 = weight_t + events.idx[e] * n_out;
        const scalar_t* w1 = weight_t + events.idx[e + 1] * n_out;
        const scalar_t* w2 = weight_t + events.idx[e + 2] * n_out;
        const scalar_t* w3 = weight_t + events.idx[e + 3] * n_out;
        for (int64_t j = 0; j < n_out; ++j)
          cur[j] += (static_cast<acc_t>(w0[j]) + static_cast<acc_t>(w1[j])) +
                    (static_cast<acc_t>(w2[j]) + static_cast<acc_t>(w3[j]));
      }
    }
    for (; e < e_end; ++e) {
      axpy<acc_t>(n_out, static_cast<acc_t>(events.value(e)), weight_t + events.idx[e] * n_out, cur);
    }
  }
};

// Chooses the path for the input current and owns the buffers it needs.
template <typename scalar_t>
struct CurrentPlan {
  at::Tensor weight_t, dense;
  InputCurrent<scalar_t> current;

  CurrentPlan(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
              const Events& ev) {
    const int64_t T = x.size(0), B = x.size(1), n_in = x.size(2), n_out = weight.size(0);
    const double density = x.numel() > 0 ? double(ev.nnz) / double(x.numel()) : 0.0;
    current.B = B;
    current.n_out = n_out;
    if (density <= kEventDensityMax) {
      weight_t = weight.t().contiguous();
      current.events = EventView<scalar_t>(ev.ptr, ev.idx, ev.val, T);
      current.weight_t = weight_t.data_ptr<scalar_t>();
      current.bias = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
    } else {
      auto x2 = x.reshape({T * B, n_in});
      dense = bias.has_value() ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
      current.dense = dense.data_ptr<scalar_t>();
    }
  }
};

}  // namespace cpu
}  // namespace sparsegrad
