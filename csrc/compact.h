// The compact tensors shared by every op (op_schemas.h): CSRs over rows r = b*T + t given as
// int32 per-row counts, and bit-packed spikes (rst_bits for reset-to-zero). Host-side helpers
// (ATen), used by the CPU kernels and by the CUDA host code alike.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <climits>
#include <cstdint>

// Every error message names the op and the argument.
#define SG_CHECK(cond, op, arg, ...) \
  TORCH_CHECK(cond, "sparsegrad.", op, ": argument '", arg, "' ", __VA_ARGS__)

namespace sparsegrad {

// rst_bits (reset="zero"): int32 [T, B, ceil(N/32)], bit j%32 of word j/32 = S[t-1, b, j].
inline int64_t bit_words(int64_t n) { return (n + 31) / 32; }

inline bool test_bit(const int32_t* words, int64_t j) {
  return (static_cast<uint32_t>(words[j >> 5]) >> (j & 31)) & 1u;
}

// Bits [..., ceil(N/32)] int32 -> values [..., N] of `dtype` (0 or 1), on the bits' device.
inline at::Tensor unpack_bits(const at::Tensor& words, int64_t n, at::ScalarType dtype) {
  const at::Tensor shifts = at::arange(32, words.options().dtype(at::kInt));
  at::Tensor bits = at::bitwise_and(at::bitwise_right_shift(words.unsqueeze(-1), shifts), 1);
  return bits.flatten(-2).narrow(-1, 0, n).to(dtype);
}

// dL/dv_init = alpha * G[0], cut where reset-to-zero has s_init = 1: alpha*(1 - R[0])*G[0].
inline at::Tensor initial_state_grad(const at::Tensor& g0, const c10::optional<at::Tensor>& rst_bits,
                                     double alpha) {
  at::Tensor dv = g0 * alpha;
  if (rst_bits.has_value())
    dv = dv * (1 - unpack_bits((*rst_bits)[0], g0.size(-1), g0.scalar_type()));
  return dv.contiguous();
}

// Int64 row offsets [rows + 1] of a CSR given by per-row counts. For CPU tensors the counts are
// checked on the way (each in [0, max_per_row], total = n_entries: O(rows)), so that no kernel
// reads past the index arrays; CUDA tensors are scanned on the device (no host synchronisation).
inline at::Tensor row_offsets(const at::Tensor& cnt, int64_t n_entries, int64_t max_per_row,
                              const char* op, const char* name) {
  const int64_t rows = cnt.numel();
  if (!cnt.is_cpu()) {
    at::Tensor offsets = at::zeros({rows + 1}, cnt.options().dtype(at::kLong));
    if (rows > 0) offsets.narrow(0, 1, rows).copy_(at::cumsum(cnt, 0, at::kLong));
    return offsets;
  }
  at::Tensor offsets = at::empty({rows + 1}, cnt.options().dtype(at::kLong));
  const at::Tensor c = cnt.contiguous();
  const int32_t* in = c.data_ptr<int32_t>();
  int64_t* out = offsets.data_ptr<int64_t>();
  int64_t total = 0;
  bool in_range = true;
  out[0] = 0;
  for (int64_t r = 0; r < rows; ++r) {
    in_range &= in[r] >= 0 && in[r] <= max_per_row;
    total += in[r];
    out[r + 1] = total;
  }
  SG_CHECK(in_range, op, name, "must hold per-row counts in [0, ", max_per_row,
           "]: this is not a CSR made by a sparsegrad forward op");
  SG_CHECK(total == n_entries, op, name, "counts add up to ", total, " but the index tensor has ",
           n_entries, " entries: the compact tensors do not belong together");
  return offsets;
}

// The columns of a CPU CSR (int64 offsets from row_offsets, int32 indices): each in [0, n_cols)
// and strictly ascending within its row, as the forward ops make them (O(n), on the host), so that
// kernels which index with them, or binary-search them, stay in bounds.
inline void check_columns(const at::Tensor& offsets, const at::Tensor& idx, int64_t n_cols,
                          const char* op, const char* name) {
  if (!idx.is_cpu()) return;  // CUDA: checked on the device (csr.cuh)
  const at::Tensor c = idx.contiguous();
  const int32_t* in = c.data_ptr<int32_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t rows = offsets.numel() - 1, n = off[rows];
  // Two flat passes that vectorise (a loop per row with the test of its first entry does not:
  // it cost more than the backward's walk over the same entries). Ascending within each row means
  // that every descent in[e - 1] >= in[e] of the flat array falls on the first entry of a row.
  const uint32_t bound = static_cast<uint32_t>(std::min<int64_t>(std::max<int64_t>(n_cols, 0), INT32_MAX));
  uint32_t outside = 0;
  for (int64_t e = 0; e < n; ++e) outside |= static_cast<uint32_t>(static_cast<uint32_t>(in[e]) >= bound);
  int64_t descents = 0;
  for (int64_t e = 1; e < n; ++e) descents += in[e - 1] >= in[e] ? 1 : 0;
  int64_t at_row_starts = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t e = off[r];
    if (e > 0 && e < off[r + 1]) at_row_starts += in[e - 1] >= in[e] ? 1 : 0;
  }
  const bool ok = outside == 0 && descents == at_row_starts;
  SG_CHECK(ok, op, name, "must hold indices in [0, ", n_cols,
           ") ascending within each row: this is not a CSR made by a sparsegrad forward op");
}

// An optional tensor made contiguous (an absent one stays absent).
inline c10::optional<at::Tensor> contiguous(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? c10::optional<at::Tensor>(t->contiguous()) : c10::nullopt;
}

// The data of an optional tensor, or null when it is absent.
template <typename T>
inline T* ptr_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

}  // namespace sparsegrad
