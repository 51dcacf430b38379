// Per-element math of the convolution ops (issue 20), written once for the CPU kernels
// (csrc/cpu/conv_cpu.cpp) and the CUDA kernels (csrc/cuda/conv.cuh, also run on the CPU by the
// host emulation): the geometry, where a tap of an input position lands, the order in which the
// event sums add up, max pooling's winner rule, the lanes of dx's dot products and the fixed
// chunks of dW / db. Only plain arithmetic: no ATen (the argument checks are conv_geom.h's).
//
// Layouts: the input of a sample is [C_in, H, W] flattened (event j = (ci*H + iy)*W + ix), the
// conv output [C_out, Ho, Wo]; channels-last buffers [Ho*Wo][C_out] hold the unpooled gradient.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>
#include <limits>

namespace sparsegrad {
namespace conv {

enum PoolKind : int { kPoolNone = 0, kPoolMax = 1, kPoolAvg = 2 };

struct ConvGeom {
  int64_t cin = 0, h = 0, w = 0, cout = 0, kh = 0, kw = 0;
  int64_t sh = 1, sw = 1, ph = 0, pw = 0, dh = 1, dw = 1, groups = 1;
  int64_t cin_g = 0, cout_g = 0, ho = 0, wo = 0;
  int pool = kPoolNone;
  int64_t pk = 1, hp = 0, wp = 0;
  C10_HOST_DEVICE int64_t in_size() const { return cin * h * w; }
  C10_HOST_DEVICE int64_t words() const { return (in_size() + 31) / 32; }
  C10_HOST_DEVICE int64_t taps() const { return kh * kw; }
  C10_HOST_DEVICE int64_t npos() const { return ho * wo; }
};

// nn.Conv2d's output length along one axis.
C10_HOST_DEVICE inline int64_t conv_out_size(int64_t n, int64_t pad, int64_t dil, int64_t k,
                                             int64_t stride) {
  return (n + 2 * pad - dil * (k - 1) - 1) / stride + 1;
}

// The output coordinate that an input coordinate reaches through one tap, given
// raw = i + pad - k*dil >= 0; -1 when the stride skips it or it lies past the output.
C10_HOST_DEVICE inline int64_t tap_target(int64_t raw, int64_t stride, int64_t n_out) {
  if (stride != 1) {
    if (raw % stride) return -1;
    raw /= stride;
  }
  return raw < n_out ? raw : -1;
}

// Calls f(k, p) for every tap k = ky*kw + kx of input position (iy, ix) that lands on an output
// position p = oy*wo + ox, taps ascending.
template <typename F>
C10_HOST_DEVICE inline void for_each_tap(const ConvGeom& g, int64_t iy, int64_t ix, F&& f) {
  for (int64_t ky = 0; ky < g.kh; ++ky) {
    const int64_t ry = iy + g.ph - ky * g.dh;
    if (ry < 0) break;  // only decreases with ky
    const int64_t oy = tap_target(ry, g.sh, g.ho);
    if (oy < 0) continue;
    for (int64_t kx = 0; kx < g.kw; ++kx) {
      const int64_t rx = ix + g.pw - kx * g.dw;
      if (rx < 0) break;
      const int64_t ox = tap_target(rx, g.sw, g.wo);
      if (ox < 0) continue;
      f(ky * g.kw + kx, oy * g.wo + ox);
    }
  }
}

// Calls f(k, iy, ix) for every tap k = ky*kw + kx of output position (oy, ox) whose input position
// (iy, ix) lies inside the input (not in the zero padding), taps ascending.
template <typename F>
C10_HOST_DEVICE inline void for_each_input_tap(const ConvGeom& g, int64_t oy, int64_t ox, F&& f) {
  for (int64_t ky = 0; ky < g.kh; ++ky) {
    const int64_t iy = oy * g.sh - g.ph + ky * g.dh;
    if (iy < 0 || iy >= g.h) continue;
    for (int64_t kx = 0; kx < g.kw; ++kx) {
      const int64_t ix = ox * g.sw - g.pw + kx * g.dw;
      if (ix >= 0 && ix < g.w) f(ky * g.kw + kx, iy, ix);
    }
  }
}

// The output position that tap (ky, kx) of input position (iy, ix) lands on, or -1.
C10_HOST_DEVICE inline int64_t tap_output(const ConvGeom& g, int64_t iy, int64_t ix, int64_t ky,
                                          int64_t kx) {
  const int64_t ry = iy + g.ph - ky * g.dh, rx = ix + g.pw - kx * g.dw;
  if (ry < 0 || rx < 0) return -1;
  const int64_t oy = tap_target(ry, g.sh, g.ho), ox = tap_target(rx, g.sw, g.wo);
  return oy < 0 || ox < 0 ? -1 : oy * g.wo + ox;
}

C10_HOST_DEVICE inline int lowest_bit(uint32_t word) {
#if defined(__CUDA_ARCH__)
  return __ffs(static_cast<int>(word)) - 1;
#else
  return __builtin_ctz(word);
#endif
}

C10_HOST_DEVICE inline int popcount32(uint32_t word) {
#if defined(__CUDA_ARCH__)
  return __popc(word);
#else
  return __builtin_popcount(word);
#endif
}

// spike_pack: word wd of row [0, m) (bit j - 32*wd set where row[j] != 0), adding the number of
// entries that are neither 0 nor 1 to *odd. Values are compared as float (any input dtype).
template <typename scalar_t>
C10_HOST_DEVICE inline uint32_t pack_word(const scalar_t* row, int64_t m, int64_t wd, int64_t* odd) {
  const int64_t j0 = wd * 32, j1 = j0 + 32 < m ? j0 + 32 : m;
  uint32_t word = 0;
  int64_t bad = 0;
  for (int64_t j = j0; j < j1; ++j) {
    const float v = static_cast<float>(row[j]);
    word |= static_cast<uint32_t>(v != 0.f) << (j - j0);
    bad += (v != 0.f) & (v != 1.f);
  }
  *odd += bad;
  return word;
}

// Calls f(j) for every set bit j in [j0, j1) of a sample's packed bit row, ascending.
template <typename F>
C10_HOST_DEVICE inline void for_each_event(const int32_t* bits, int64_t j0, int64_t j1, F&& f) {
  for (int64_t wd = j0 / 32; wd * 32 < j1; ++wd) {
    uint32_t word = static_cast<uint32_t>(bits[wd]);
    if (wd * 32 < j0) word &= ~0u << (j0 - wd * 32);
    if (j1 - wd * 32 < 32) word &= (1u << (j1 - wd * 32)) - 1u;
    while (word) {
      f(wd * 32 + lowest_bit(word));
      word &= word - 1;
    }
  }
}

// Max pooling's rule (ATen's): a window's winner is its first maximum, or its last NaN; start from
// best = -inf, arg = 0 and take each value in window order when this holds.
template <typename scalar_t>
C10_HOST_DEVICE inline bool pool_takes(scalar_t v, scalar_t best) {
  return v > best || v != v;
}

// One window (py, px) of kernel = stride = pk pooling of a dense map src [*, wo]: max (the winner's
// offset a*pk + c in the window to *arg) or avg (the sum in window order over pk*pk).
template <typename scalar_t>
C10_HOST_DEVICE inline scalar_t pool_window(const scalar_t* src, int64_t wo, int64_t py, int64_t px,
                                            int64_t pk, int kind, uint8_t* arg) {
  const scalar_t* win = src + py * pk * wo + px * pk;
  if (kind == kPoolMax) {
    scalar_t best = -std::numeric_limits<scalar_t>::infinity();
    int64_t slot = 0;
    for (int64_t a = 0; a < pk; ++a)
      for (int64_t c = 0; c < pk; ++c) {
        const scalar_t v = win[a * wo + c];
        if (pool_takes(v, best)) {
          best = v;
          slot = a * pk + c;
        }
      }
    *arg = static_cast<uint8_t>(slot);
    return best;
  }
  scalar_t s = 0;
  for (int64_t a = 0; a < pk; ++a)
    for (int64_t c = 0; c < pk; ++c) s += win[a * wo + c];
  return s / static_cast<scalar_t>(pk * pk);
}

// The forward sums each output's weight rows in one of two orders, chosen by the shape: "taps
// major" (tap (ky, kx) ascending, then input channel ascending) where the CPU gathers a sample in
// vector registers (groups 1, C_in <= 64, C_out a supported number of 64-byte vectors), else
// "channels major" (input channel ascending, then tap), the order of adding event by event.
inline bool forward_taps_major(int64_t groups, int64_t cin, int64_t cout, int64_t scalar_bytes) {
  const int64_t lanes = 64 / scalar_bytes;
  if (groups != 1 || cin > 64 || cout % lanes) return false;
  const int64_t nv = cout / lanes;
  return nv == 1 || nv == 2 || nv == 3 || nv == 4 || nv == 6 || nv == 8;
}

// dx at one input entry (ci, iy, ix): sum over taps and the group's output channels c of
// Wt[ci][k][c] * G[p][c0 + c]. Lane l sums the channels c with c % kDxLanes == l over all taps,
// then the lanes are added in a fixed tree and the tail channels last: vectorises on the CPU
// without reassociating, the same bits on every device.
// wrow: Wt[ci] as [taps][cout_g]; gcl: the sample's unpooled gradient channels-last [Ho*Wo][C_out].
constexpr int64_t kDxLanes = 16;

template <typename scalar_t>
C10_HOST_DEVICE inline scalar_t lane_sum(const scalar_t* v) {
  scalar_t h[kDxLanes];
  for (int64_t l = 0; l < kDxLanes; ++l) h[l] = v[l];
  for (int64_t n = kDxLanes / 2; n >= 1; n /= 2)
    for (int64_t l = 0; l < n; ++l) h[l] += h[l + n];
  return h[0];
}

template <typename scalar_t>
C10_HOST_DEVICE inline scalar_t dx_dot(const ConvGeom& g, int64_t ci, int64_t iy, int64_t ix,
                                       const scalar_t* wrow, const scalar_t* gcl) {
  const int64_t c0 = (ci / g.cin_g) * g.cout_g;
  const int64_t full = g.cout_g - g.cout_g % kDxLanes;
  scalar_t acc[kDxLanes] = {};
  scalar_t tail = 0;
  for_each_tap(g, iy, ix, [&](int64_t k, int64_t p) {
    const scalar_t* __restrict__ wv = wrow + k * g.cout_g;
    const scalar_t* __restrict__ gv = gcl + p * g.cout + c0;
    for (int64_t c = 0; c < full; c += kDxLanes)
      for (int64_t l = 0; l < kDxLanes; ++l) acc[l] += wv[c + l] * gv[c + l];
    for (int64_t c = full; c < g.cout_g; ++c) tail += wv[c] * gv[c];
  });
  return lane_sum(acc) + tail;
}

// dW and db are summed per fixed chunk of samples (at most 8, whatever the number of threads or
// the device), the chunks added in order: the same bits everywhere.
C10_HOST_DEVICE inline int64_t grad_chunks(int64_t n) { return n < 1 ? 1 : (n < 8 ? n : 8); }
C10_HOST_DEVICE inline int64_t chunk_begin(int64_t chunk, int64_t n, int64_t chunks) {
  return chunk * n / chunks;
}

// Sample s = t*B + b of the folded batch is row b*T + t of a producer's CSR, and back.
C10_HOST_DEVICE inline int64_t csr_row_of_sample(int64_t s, int64_t batch, int64_t steps) {
  return (s % batch) * steps + s / batch;
}
C10_HOST_DEVICE inline int64_t sample_of_csr_row(int64_t r, int64_t batch, int64_t steps) {
  return (r % steps) * batch + r / steps;
}

}  // namespace conv
}  // namespace sparsegrad
