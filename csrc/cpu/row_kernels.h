// The per-row pieces of the CPU forward kernels (LIF and readout):
//   - per-thread scratch that keeps its capacity between calls, so compact outputs whose sizes
//     are known only at the end are written once into it and copied once into their tensors
//     (no per-element push_back, no page faults in steady state);
//   - scanning a row of x into its input events (AVX-512 compares and compresses where the
//     machine has them);
//   - the event-driven input current of a row, summed in SIMD registers over tiles of output
//     neurons.
// CPU only: the CUDA build does not include this header.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu/cpu_common.h"
#include "cpu/phase_profile.h"

namespace sparsegrad {
namespace cpu {

// ------------------------------------------------------------------------------------------
// Per-thread scratch. Slots are fixed roles (kScratch*); a kernel uses a slot only between the
// start of its parallel region and the copy out of it, and the ops never nest.
// ------------------------------------------------------------------------------------------
enum ScratchSlot : int { kScratchIdxA = 0, kScratchValA, kScratchIdxB, kScratchValB, kScratchSlots };

// Vector stores may write this many elements past the end of what a row appends.
constexpr int64_t kScratchSlack = 64;
// A buffer grown beyond this by one large call is released by the next call of the thread.
constexpr int64_t kScratchKeepBytes = int64_t(64) << 20;

class Scratch {
 public:
  // Room for `need` more bytes after the first `used`; returns the base (the data may move).
  char* reserve(int64_t used, int64_t need) {
    if (used + need > cap_) {
      const int64_t n = std::max<int64_t>(used + need, cap_ + cap_ / 2) + 4096;
      std::unique_ptr<char[]> grown(new char[n]);
      if (used > 0) std::memcpy(grown.get(), buf_.get(), used);
      buf_ = std::move(grown);
      cap_ = n;
    }
    return buf_.get();
  }
  void shrink_if_large() {
    if (cap_ > kScratchKeepBytes) {
      buf_.reset();
      cap_ = 0;
    }
  }

 private:
  std::unique_ptr<char[]> buf_;
  int64_t cap_ = 0;
};

inline Scratch& thread_scratch(int slot) {
  static thread_local Scratch slots[kScratchSlots];
  return slots[slot];
}

// Entries (int32 index + value) appended row by row by one task into its scratch, in whatever
// row order the task walks. reserve(n) before writing up to n entries of a row.
template <typename val_t>
struct CompactAppender {
  Scratch* idx_scratch;
  Scratch* val_scratch;  // null: indices only
  int64_t used = 0;
  int32_t* idx = nullptr;
  val_t* val = nullptr;

  CompactAppender(int idx_slot, int val_slot)
      : idx_scratch(&thread_scratch(idx_slot)), val_scratch(val_slot >= 0 ? &thread_scratch(val_slot) : nullptr) {
    idx_scratch->shrink_if_large();
    if (val_scratch) val_scratch->shrink_if_large();
    reserve(0);
  }
  void reserve(int64_t n) {
    const int64_t need = n + kScratchSlack;
    idx = reinterpret_cast<int32_t*>(idx_scratch->reserve(used * int64_t(sizeof(int32_t)), need * int64_t(sizeof(int32_t))));
    if (val_scratch)
      val = reinterpret_cast<val_t*>(val_scratch->reserve(used * int64_t(sizeof(val_t)), need * int64_t(sizeof(val_t))));
  }
};

// Per-row lists (rows b*T + t) written by tasks that each own a range of batch elements: the
// row's count, and where its entries lie in its task's scratch (valid after the parallel region,
// until the slots are used again).
template <typename val_t>
struct RowLists {
  int64_t T = 0;
  int32_t* cnt = nullptr;       // [B*T], owned by the caller (often an output tensor)
  std::vector<int64_t> start;   // [B*T]: offset of the row's entries in its task's scratch
  std::vector<const int32_t*> idx_base;  // [B]
  std::vector<const val_t*> val_base;    // [B]

  RowLists(int64_t steps, int64_t B, int32_t* counts)
      : T(steps), cnt(counts), start(B * steps), idx_base(B, nullptr), val_base(B, nullptr) {}
  void set(const CompactAppender<val_t>& a, int64_t b, int64_t t, int64_t n) {
    start[b * T + t] = a.used;
    cnt[b * T + t] = static_cast<int32_t>(n);
  }
  // At the end of a task that appended the rows of elements b0 .. b1-1.
  void finish(const CompactAppender<val_t>& a, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      idx_base[b] = a.idx;
      val_base[b] = a.val;
    }
  }
  const int32_t* idx(int64_t b, int64_t t) const { return idx_base[b] + start[b * T + t]; }
  const val_t* val(int64_t b, int64_t t) const { return val_base[b] + start[b * T + t]; }
  int64_t count(int64_t b, int64_t t) const { return cnt[b * T + t]; }
};

// Row offsets (int64 [rows + 1]) from per-row counts.
inline void offsets_from_counts(const int32_t* cnt, int64_t rows, int64_t* off) {
  int64_t s = 0;
  off[0] = 0;
  for (int64_t r = 0; r < rows; ++r) {
    s += cnt[r];
    off[r + 1] = s;
  }
}

// dst[0 .. n) = src[0 .. n) for the few entries of one row (4- or 8-byte elements).
template <typename T>
inline void copy_row(T* __restrict__ dst, const T* __restrict__ src, int64_t n) {
#if defined(__AVX512F__)
  if (sizeof(T) == 4 || sizeof(T) == 8) {
    constexpr int64_t kPer = 64 / int64_t(sizeof(T));
    for (; n >= kPer; n -= kPer, dst += kPer, src += kPer)
      _mm512_storeu_si512(dst, _mm512_loadu_si512(src));
    if (n > 0) {
      if (sizeof(T) == 4) {
        const __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
        _mm512_mask_storeu_epi32(dst, m, _mm512_maskz_loadu_epi32(m, src));
      } else {
        const __mmask8 m = static_cast<__mmask8>((1u << n) - 1u);
        _mm512_mask_storeu_epi64(dst, m, _mm512_maskz_loadu_epi64(m, src));
      }
    }
    return;
  }
#endif
  for (int64_t k = 0; k < n; ++k) dst[k] = src[k];
}

// Copies the rows into one CSR (rows b*T + t; off from the counts); val_out null: indices only.
template <typename val_t>
void gather_rows(const RowLists<val_t>& rows, const int64_t* off, int64_t B, int32_t* idx_out,
                 val_t* val_out) {
  const int64_t T = rows.T;
  at::parallel_for(0, B, grain_for(off[B * T] / std::max<int64_t>(B, 1) + 4 * T), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t t = 0; t < T; ++t) {
        const int64_t r = b * T + t, n = off[r + 1] - off[r];
        copy_row(idx_out + off[r], rows.idx(b, t), n);
        if (val_out) copy_row(val_out + off[r], rows.val(b, t), n);
      }
    }
  });
}

// Copies n elements to dst with non-temporal stores where the machine has them: outputs that are
// written once and read by a later op skip the read-for-ownership of every cache line and do
// not evict the kernel's working set (SHD network step, 1 thread: 6-9 % faster than plain
// stores). Call stream_fence() before the data is read elsewhere.
template <typename T>
inline void stream_copy(T* dst, const T* src, int64_t n) {
#if defined(__AVX512F__)
  if (std::is_same<T, float>::value || std::is_same<T, double>::value) {
    constexpr int64_t kPerVec = 64 / int64_t(sizeof(T));
    for (; n > 0 && (reinterpret_cast<uintptr_t>(dst) & 63) != 0; --n) *dst++ = *src++;
    for (; n >= kPerVec; n -= kPerVec, dst += kPerVec, src += kPerVec)
      _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), _mm512_loadu_si512(src));
  }
#endif
  if (n > 0) std::memcpy(dst, src, n * sizeof(T));
}

inline void stream_fence() {
#if defined(__AVX512F__)
  _mm_sfence();
#endif
}

// Batch elements are walked in blocks, t outer and b inner within a block, so that the rows a
// step reads or writes ([t, b0 .. b1, :]) are contiguous in memory; a block's state stays in L2.
inline int64_t batch_block(int64_t B, int64_t state_bytes_per_element) {
  constexpr int64_t kStateBytes = int64_t(96) << 10;
  return std::max<int64_t>(1, std::min<int64_t>({B, 32, kStateBytes / std::max<int64_t>(1, state_bytes_per_element)}));
}

// ------------------------------------------------------------------------------------------
// Scanning a row of x: the indices and values of its nonzeros (NaN counts as nonzero, -0 does
// not, as `x != 0`), in ascending order. Writes up to kScratchSlack entries past the count.
// ------------------------------------------------------------------------------------------
template <typename scalar_t>
inline int64_t scan_row(const scalar_t* row, int64_t n, int32_t* idx, scalar_t* val, bool& nonbinary) {
  int64_t k = 0;
  bool nb = false;
  for (int64_t i0 = 0; i0 < n; i0 += kScanBlock) {
    const int64_t i1 = std::min(n, i0 + kScanBlock);
    for (uint32_t mask = nonzero_mask(row + i0, i1 - i0); mask != 0; mask &= mask - 1) {
      const int64_t i = i0 + __builtin_ctz(mask);
      const scalar_t v = row[i];
      idx[k] = static_cast<int32_t>(i);
      val[k] = v;
      nb |= (v != scalar_t(1));
      ++k;
    }
  }
  nonbinary |= nb;
  return k;
}

#if defined(__AVX512F__)
// 16 lanes at a time: compare against 0, compress the hits in registers (a compressing store to
// memory is microcoded and slow on some cores) and store whole vectors.
template <>
inline int64_t scan_row<float>(const float* row, int64_t n, int32_t* idx, float* val, bool& nonbinary) {
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
  __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i step = _mm512_set1_epi32(16);
  int64_t k = 0;
  __mmask16 nb = 0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(row + i);
    const __mmask16 m = _mm512_cmp_ps_mask(v, zero, _CMP_NEQ_UQ);
    // no branch on m: most blocks of a sparse row are empty, unpredictably
    _mm512_storeu_si512(idx + k, _mm512_maskz_compress_epi32(m, lane));
    _mm512_storeu_ps(val + k, _mm512_maskz_compress_ps(m, v));
    nb |= _mm512_mask_cmp_ps_mask(m, v, one, _CMP_NEQ_UQ);
    k += __builtin_popcount(m);
    lane = _mm512_add_epi32(lane, step);
  }
  if (i < n) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (n - i)) - 1u);
    const __m512 v = _mm512_maskz_loadu_ps(tail, row + i);
    const __mmask16 m = _mm512_mask_cmp_ps_mask(tail, v, zero, _CMP_NEQ_UQ);
    if (m) {
      _mm512_storeu_si512(idx + k, _mm512_maskz_compress_epi32(m, lane));
      _mm512_storeu_ps(val + k, _mm512_maskz_compress_ps(m, v));
      nb |= _mm512_mask_cmp_ps_mask(m, v, one, _CMP_NEQ_UQ);
      k += __builtin_popcount(m);
    }
  }
  nonbinary |= nb != 0;
  return k;
}
#endif

// The input events of x [T, B, N] in per-row counts (rows b*T + t), row offsets, indices and
// values (values empty when every nonzero of x is 1). One pass over x.
struct ScannedEvents {
  at::Tensor cnt;  // [B*T] int32
  at::Tensor off;  // [B*T+1] int64
  at::Tensor idx;  // [nnz] int32
  at::Tensor val;  // [nnz] or [0]
  int64_t nnz = 0;
  bool binary = true;

  Events as_events() const {
    Events ev;
    ev.ptr = off;
    ev.cnt = cnt;
    ev.idx = idx;
    ev.val = val;
    ev.nnz = nnz;
    ev.binary = binary;
    return ev;
  }
};

// The scan keeps its rows in scratch (slots A) until the caller is done with `rows`: the
// forward reads the events from there in its own walk order, then from the CSR.
template <typename scalar_t>
struct EventScan {
  ScannedEvents ev;
  RowLists<scalar_t> rows;
  EventScan(int64_t T, int64_t B, int32_t* cnt) : rows(T, B, cnt) {}
};

template <typename scalar_t>
std::unique_ptr<EventScan<scalar_t>> scan_events(const at::Tensor& x) {
  const int64_t T = x.size(0), B = x.size(1), N = x.size(2);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  at::Tensor cnt_t = at::empty({B * T}, x.options().dtype(at::kInt));
  std::unique_ptr<EventScan<scalar_t>> scan(new EventScan<scalar_t>(T, B, cnt_t.data_ptr<int32_t>()));
  ScannedEvents& ev = scan->ev;
  RowLists<scalar_t>& rows = scan->rows;
  ev.cnt = cnt_t;
  ev.off = at::empty({B * T + 1}, x.options().dtype(at::kLong));
  std::vector<char> nonbinary(B, 0);
  const int64_t block = batch_block(B, N * int64_t(sizeof(scalar_t)) / 4);
  profile::Scope timer(profile::kFwdScan);
  at::parallel_for(0, B, grain_for(T * N / 4), [&](int64_t b0, int64_t b1) {
    CompactAppender<scalar_t> out(kScratchIdxA, kScratchValA);
    bool nb = false;
    for (int64_t c0 = b0; c0 < b1; c0 += block) {
      const int64_t c1 = std::min(b1, c0 + block);
      for (int64_t t = 0; t < T; ++t) {
        out.reserve((c1 - c0) * N);
        for (int64_t b = c0; b < c1; ++b) {
          const int64_t k = scan_row(xp + (t * B + b) * N, N, out.idx + out.used, out.val + out.used, nb);
          rows.set(out, b, t, k);
          out.used += k;
        }
      }
    }
    rows.finish(out, b0, b1);
    nonbinary[b0] = nb;
  });
  timer.next(profile::kFwdGatherEvents);
  int64_t* off = ev.off.data_ptr<int64_t>();
  offsets_from_counts(rows.cnt, B * T, off);
  ev.nnz = off[B * T];
  for (int64_t b = 0; b < B; ++b) ev.binary = ev.binary && !nonbinary[b];
  ev.idx = at::empty({ev.nnz}, x.options().dtype(at::kInt));
  ev.val = at::empty({ev.binary ? 0 : ev.nnz}, x.options());
  gather_rows<scalar_t>(rows, off, B, ev.idx.data_ptr<int32_t>(),
                        ev.binary ? nullptr : ev.val.data_ptr<scalar_t>());
  return scan;
}

// ------------------------------------------------------------------------------------------
// Input currents. Output neurons are padded to whole tiles of L = 64 / sizeof(acc_t) lanes
// (one SIMD register); W^T is stored padded, [N_in, tiles * L], with zeros in the padding.
// The event sum of a row is, per neuron, exactly the order the CUDA kernel uses:
//   binary x:     cur = bias; per 4 events cur += (w0 + w1) + (w2 + w3); then cur += w each
//   non-binary x: cur = bias; per event cur += v * w
// ------------------------------------------------------------------------------------------
template <typename acc_t>
struct Padded {
  static constexpr int64_t L = tile_lanes<acc_t>();
  static int64_t tiles(int64_t n) { return (n + L - 1) / L; }
  static int64_t width(int64_t n) { return tiles(n) * L; }
};

// Up to this many tiles (256 float neurons) of a row's current are summed in registers at once.
constexpr int kCurrentTiles = 16;

template <int R, bool kBinary, typename acc_t>
inline void event_current_tiles(const acc_t* wt, int64_t ld, const int32_t* idx, const acc_t* val,
                                int64_t ne, const acc_t* init, acc_t* out) {
  using vec = typename TileVec<acc_t>::type;
  constexpr int64_t L = tile_lanes<acc_t>();
  vec acc[R];
  SG_UNROLL_16
  for (int r = 0; r < R; ++r) {
    if (init)
      __builtin_memcpy(&acc[r], init + r * L, sizeof(vec));
    else
      acc[r] = vec{};
  }
  int64_t e = 0;
  if (kBinary) {
    for (; e + 4 <= ne; e += 4) {
      const acc_t* w0 = wt + int64_t(idx[e]) * ld;
      const acc_t* w1 = wt + int64_t(idx[e + 1]) * ld;
      const acc_t* w2 = wt + int64_t(idx[e + 2]) * ld;
      const acc_t* w3 = wt + int64_t(idx[e + 3]) * ld;
      SG_UNROLL_16
      for (int r = 0; r < R; ++r) {
        vec a, b, c, d;
        __builtin_memcpy(&a, w0 + r * L, sizeof(vec));
        __builtin_memcpy(&b, w1 + r * L, sizeof(vec));
        __builtin_memcpy(&c, w2 + r * L, sizeof(vec));
        __builtin_memcpy(&d, w3 + r * L, sizeof(vec));
        acc[r] += (a + b) + (c + d);
      }
    }
    for (; e < ne; ++e) {
      const acc_t* w = wt + int64_t(idx[e]) * ld;
      SG_UNROLL_16
      for (int r = 0; r < R; ++r) {
        vec a;
        __builtin_memcpy(&a, w + r * L, sizeof(vec));
        acc[r] += a;
      }
    }
  } else {
    for (; e < ne; ++e) {
      const acc_t* w = wt + int64_t(idx[e]) * ld;
      const acc_t v = val[e];
      SG_UNROLL_16
      for (int r = 0; r < R; ++r) {
        vec a;
        __builtin_memcpy(&a, w + r * L, sizeof(vec));
        acc[r] += v * a;
      }
    }
  }
  SG_UNROLL_16
  for (int r = 0; r < R; ++r) __builtin_memcpy(out + r * L, &acc[r], sizeof(vec));
}

template <bool kBinary, typename acc_t>
inline void event_current_group(int R, const acc_t* wt, int64_t ld, const int32_t* idx, const acc_t* val,
                                int64_t ne, const acc_t* init, acc_t* out) {
#define SG_CURRENT_CASE(n) \
  case n: event_current_tiles<n, kBinary, acc_t>(wt, ld, idx, val, ne, init, out); break;
  switch (R) {
    SG_CURRENT_CASE(16) SG_CURRENT_CASE(15) SG_CURRENT_CASE(14) SG_CURRENT_CASE(13)
    SG_CURRENT_CASE(12) SG_CURRENT_CASE(11) SG_CURRENT_CASE(10) SG_CURRENT_CASE(9)
    SG_CURRENT_CASE(8) SG_CURRENT_CASE(7) SG_CURRENT_CASE(6) SG_CURRENT_CASE(5)
    SG_CURRENT_CASE(4) SG_CURRENT_CASE(3) SG_CURRENT_CASE(2) default: SG_CURRENT_CASE(1)
  }
#undef SG_CURRENT_CASE
}

// The current of every row: from the events (W^T padded) or from one GEMM up front when x is
// denser than kEventDensityMax. `fill(b, t, cur)` writes the padded row cur[0 .. width).
template <typename scalar_t>
struct RowCurrent {
  using acc_t = at::opmath_type<scalar_t>;
  static_assert(std::is_same<scalar_t, acc_t>::value, "float and double only");
  at::Tensor weight_t, bias_pad, dense;
  const acc_t* wt = nullptr;
  const acc_t* bias = nullptr;  // padded, or null
  const scalar_t* dense_p = nullptr;
  const RowLists<scalar_t>* rows = nullptr;
  bool from_gemm = false;  // (an empty GEMM result has a null data pointer: keep the route apart)
  bool binary = true;
  int64_t T = 0, B = 0, n_out = 0, width = 0, tiles = 0;

  RowCurrent(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias_in,
             const EventScan<scalar_t>& scan) {
    const ScannedEvents& ev = scan.ev;
    T = x.size(0);
    B = x.size(1);
    const int64_t n_in = x.size(2);
    n_out = weight.size(0);
    tiles = Padded<acc_t>::tiles(n_out);
    width = Padded<acc_t>::width(n_out);
    const double density = x.numel() > 0 ? double(ev.nnz) / double(x.numel()) : 0.0;
    if (density <= kEventDensityMax) {
      weight_t = at::zeros({n_in, width}, weight.options());
      if (n_in > 0 && n_out > 0) weight_t.narrow(1, 0, n_out).copy_(weight.t());
      wt = weight_t.data_ptr<acc_t>();
      if (bias_in.has_value()) {
        bias_pad = at::zeros({width}, weight.options());
        if (n_out > 0) bias_pad.narrow(0, 0, n_out).copy_(*bias_in);
        bias = bias_pad.data_ptr<acc_t>();
      }
      rows = &scan.rows;
      binary = ev.binary;
    } else {
      auto x2 = x.reshape({T * B, n_in});
      dense = bias_in.has_value() ? at::addmm(*bias_in, x2, weight.t()) : at::mm(x2, weight.t());
      dense_p = dense.data_ptr<scalar_t>();
      from_gemm = true;
    }
  }

  void fill(int64_t b, int64_t t, acc_t* cur) const {
    if (from_gemm) {
      const scalar_t* row = dense_p + (t * B + b) * n_out;
      for (int64_t j = 0; j < n_out; ++j) cur[j] = static_cast<acc_t>(row[j]);
      for (int64_t j = n_out; j < width; ++j) cur[j] = acc_t(0);
      return;
    }
    const int64_t ne = rows->count(b, t);
    const int32_t* idx = rows->idx(b, t);
    const scalar_t* val = rows->val(b, t);
    constexpr int64_t L = tile_lanes<acc_t>();
    for (int64_t g = 0; g < tiles; g += kCurrentTiles) {
      const int R = static_cast<int>(std::min<int64_t>(kCurrentTiles, tiles - g));
      const acc_t* init = bias ? bias + g * L : nullptr;
      if (!binary)
        event_current_group<false, acc_t>(R, wt + g * L, width, idx, val, ne, init, cur + g * L);
      else
        event_current_group<true, acc_t>(R, wt + g * L, width, idx, nullptr, ne, init, cur + g * L);
    }
  }
};

}  // namespace cpu
}  // namespace sparsegrad
