// Kernels of the convolution ops (issue 20; host code: conv_host.h). Every float output has one
// writer, each thread summing in the order the CPU kernels (csrc/cpu/conv_cpu.cpp) add up, so the
// results are the CPU's bits on every run; the per-element math is csrc/conv_math.h's.
//
//   spike_pack            one thread per bit word; the counts by block sums + integer atomics
//   spike_conv2d_forward  one thread per pooled output: its window's conv values gathered from the
//                         bits (the weight rows of the events under its taps), bias, pooling
//   conv_pool2d           one thread per pooled output
//   conv_unpool           one thread per conv-output entry (conv_unpool2d, and the backward's
//                         unpooled gradient, channels-last for the sums below)
//   dW, db                per fixed chunk of samples: one thread per (chunk, weight entry) walking
//                         the chunk's input events of its channel, one per (chunk, channel) for
//                         db; the chunks then added in order (chunk_sum_kernel)
//   dx                    one thread per entry of the producer's active set (conv_math dx_dot)
#pragma once

#include "conv_math.h"
#include "cuda/csr.cuh"
#include "cuda/kernel_common.cuh"

namespace sparsegrad {
namespace cuda {

template <typename scalar_t>
__global__ void spike_pack_kernel(const scalar_t* __restrict__ x, int64_t n, int64_t m, int64_t words,
                                  int32_t* __restrict__ bits, int64_t* __restrict__ info) {
  int64_t cnt = 0, odd = 0;
  SG_KERNEL_LOOP(k, n * words) {
    const int64_t r = k / words, wd = k % words;
    const uint32_t word = conv::pack_word(x + r * m, m, wd, &odd);
    cnt += conv::popcount32(word);
    bits[k] = static_cast<int32_t>(word);
  }
  // whole-warp launch: every thread of the block reaches the sums
  cnt = block_sum(cnt);
  odd = block_sum(odd);
  if (thread_in_block() == 0) {
    atomic_add_count(info, cnt);
    atomic_add_count(info + 1, odd);
  }
}

template <typename scalar_t>
struct ConvForwardArgs {
  const int32_t* bits = nullptr;     // [N, words]
  const scalar_t* weight = nullptr;  // [C_out, C_in/groups, KH, KW]
  const scalar_t* bias = nullptr;    // [C_out] or null
  scalar_t* out = nullptr;           // [N, C_out, Hp, Wp]
  uint8_t* pool_idx = nullptr;       // same shape (max pooling), or null
  conv::ConvGeom g;
  int64_t n = 0;
  bool taps_major = false;           // conv::forward_taps_major: the CPU's order of the sums
};

// The conv output (before the bias) of sample s, channel co, position (oy, ox): the weights of
// the input events under its taps, added in the CPU kernel's order.
template <typename scalar_t>
__device__ __forceinline__ scalar_t conv_value(const ConvForwardArgs<scalar_t>& a, int64_t s, int64_t co,
                                               int64_t oy, int64_t ox) {
  const conv::ConvGeom& g = a.g;
  const int32_t* bs = a.bits + s * g.words();
  const int64_t ci0 = (co / g.cout_g) * g.cin_g;
  const scalar_t* wc = a.weight + co * g.cin_g * g.taps();
  scalar_t acc = 0;
  auto add = [&](int64_t cl, int64_t k, int64_t iy, int64_t ix) {
    if (bit_set(bs, ((ci0 + cl) * g.h + iy) * g.w + ix)) acc += wc[cl * g.taps() + k];
  };
  if (a.taps_major) {  // taps ascending, then channels (the CPU's gather in vector registers)
    conv::for_each_input_tap(g, oy, ox, [&](int64_t k, int64_t iy, int64_t ix) {
      for (int64_t cl = 0; cl < g.cin_g; ++cl) add(cl, k, iy, ix);
    });
  } else {  // channels ascending, then taps (event by event)
    for (int64_t cl = 0; cl < g.cin_g; ++cl)
      conv::for_each_input_tap(g, oy, ox, [&](int64_t k, int64_t iy, int64_t ix) { add(cl, k, iy, ix); });
  }
  return acc;
}

template <typename scalar_t>
__global__ void spike_conv2d_forward_kernel(ConvForwardArgs<scalar_t> a) {
  const conv::ConvGeom& g = a.g;
  SG_KERNEL_LOOP(k, a.n * g.cout * g.hp * g.wp) {
    const int64_t px = k % g.wp, py = (k / g.wp) % g.hp, co = (k / (g.wp * g.hp)) % g.cout;
    const int64_t s = k / (g.wp * g.hp * g.cout);
    const scalar_t bias = a.bias ? a.bias[co] : scalar_t(0);
    if (g.pool == conv::kPoolNone) {
      a.out[k] = conv_value(a, s, co, py, px) + bias;
      continue;
    }
    scalar_t best = g.pool == conv::kPoolMax ? -std::numeric_limits<scalar_t>::infinity() : scalar_t(0);
    int64_t arg = 0;
    for (int64_t r = 0; r < g.pk; ++r)
      for (int64_t c = 0; c < g.pk; ++c) {
        const scalar_t v = conv_value(a, s, co, py * g.pk + r, px * g.pk + c) + bias;
        if (g.pool == conv::kPoolAvg) {
          best += v;
        } else if (conv::pool_takes(v, best)) {
          best = v;
          arg = r * g.pk + c;
        }
      }
    if (g.pool == conv::kPoolMax) {
      a.out[k] = best;
      a.pool_idx[k] = static_cast<uint8_t>(arg);
    } else {
      a.out[k] = best * (scalar_t(1) / static_cast<scalar_t>(g.pk * g.pk));
    }
  }
}

// y [NC, Ho, Wo] -> out [NC, Hp, Wp] (+ max pooling's winner offsets).
template <typename scalar_t>
__global__ void conv_pool2d_kernel(const scalar_t* __restrict__ y, int64_t nc, int64_t ho, int64_t wo,
                                   int64_t pk, int kind, scalar_t* __restrict__ out,
                                   uint8_t* __restrict__ pool_idx) {
  const int64_t hp = ho / pk, wp = wo / pk;
  SG_KERNEL_LOOP(k, nc * hp * wp) {
    const int64_t px = k % wp, py = (k / wp) % hp, q = k / (wp * hp);
    uint8_t arg = 0;
    out[k] = conv::pool_window(y + q * ho * wo, wo, py, px, pk, kind, &arg);
    if (kind == conv::kPoolMax) pool_idx[k] = arg;
  }
}

template <typename scalar_t>
struct UnpoolArgs {
  const scalar_t* grad = nullptr;    // [N, C, Hp, Wp] (pool none: Hp = h, Wp = w)
  const uint8_t* pool_idx = nullptr; // max pooling's winner offsets, grad's shape
  int64_t n = 0, c = 0, hp = 0, wp = 0, h = 0, w = 0, pk = 1;
  int kind = conv::kPoolNone;
  bool drop_zero = false;            // a zero gradient unpools to +0 (the backward's rule)
  bool channels_last = false;        // out [N, h, w, C] instead of [N, C, h, w]
  scalar_t* out = nullptr;
  int32_t* flag = nullptr;
};

// Every entry of the unpooled map written once: the window's gradient at max pooling's winner
// (zero elsewhere), avg's gradient / k^2 everywhere in the window, zero outside every window.
template <typename scalar_t>
__global__ void conv_unpool_kernel(UnpoolArgs<scalar_t> a) {
  SG_KERNEL_LOOP(k, a.n * a.c * a.h * a.w) {
    int64_t x, y, co, s;
    if (a.channels_last) {
      co = k % a.c;
      x = (k / a.c) % a.w;
      y = (k / (a.c * a.w)) % a.h;
      s = k / (a.c * a.w * a.h);
    } else {
      x = k % a.w;
      y = (k / a.w) % a.h;
      co = (k / (a.w * a.h)) % a.c;
      s = k / (a.w * a.h * a.c);
    }
    scalar_t value = 0;
    const int64_t py = y / a.pk, px = x / a.pk;
    if (py < a.hp && px < a.wp) {
      const int64_t o = ((s * a.c + co) * a.hp + py) * a.wp + px;
      const scalar_t v = a.grad[o];
      if (a.kind == conv::kPoolMax) {
        const int64_t slot = a.pool_idx[o], here = (y % a.pk) * a.pk + x % a.pk;
        if (slot >= a.pk * a.pk && here == 0) raise_flag(a.flag, kFlagPoolIdx);
        if (slot == here) value = v;
      } else if (a.kind == conv::kPoolAvg) {
        value = v * (scalar_t(1) / static_cast<scalar_t>(a.pk * a.pk));
      } else {
        value = v;
      }
      if (a.drop_zero && v == scalar_t(0)) value = scalar_t(0);
    }
    a.out[k] = value;
  }
}

// part[chunk][co] = the sum over the chunk's samples s (those with a gradient, any[s]) and the
// positions p ascending of gcl[s][p][co] (the CPU's order).
template <typename scalar_t>
__global__ void conv_db_partial_kernel(const scalar_t* __restrict__ gcl, const bool* __restrict__ any,
                                       int64_t n, int64_t npos, int64_t cout, int64_t chunks,
                                       scalar_t* __restrict__ part) {
  SG_KERNEL_LOOP(k, chunks * cout) {
    const int64_t chunk = k / cout, co = k % cout;
    scalar_t acc = 0;
    for (int64_t s = conv::chunk_begin(chunk, n, chunks); s < conv::chunk_begin(chunk + 1, n, chunks); ++s) {
      if (!any[s]) continue;
      const scalar_t* gs = gcl + s * npos * cout + co;
      for (int64_t p = 0; p < npos; ++p) acc += gs[p * cout];
    }
    part[k] = acc;
  }
}

// part[chunk][ci][k][c] (the CPU's transposed layout) = the sum over the chunk's samples and the
// events of input channel ci, ascending, of the unpooled gradient at the output position that tap
// k of the event lands on, output channel c of ci's group.
template <typename scalar_t>
__global__ void conv_dw_partial_kernel(const int32_t* __restrict__ bits, const scalar_t* __restrict__ gcl,
                                       const bool* __restrict__ any, conv::ConvGeom g, int64_t n,
                                       int64_t chunks, scalar_t* __restrict__ part) {
  const int64_t wsize = g.cin * g.taps() * g.cout_g, plane = g.h * g.w;
  SG_KERNEL_LOOP(q, chunks * wsize) {
    const int64_t chunk = q / wsize, r = q % wsize;
    const int64_t ci = r / (g.taps() * g.cout_g), tap = (r / g.cout_g) % g.taps(), c = r % g.cout_g;
    const int64_t ky = tap / g.kw, kx = tap % g.kw, co = (ci / g.cin_g) * g.cout_g + c;
    scalar_t acc = 0;
    for (int64_t s = conv::chunk_begin(chunk, n, chunks); s < conv::chunk_begin(chunk + 1, n, chunks); ++s) {
      if (!any[s]) continue;
      const scalar_t* gs = gcl + s * g.npos() * g.cout + co;
      conv::for_each_event(bits + s * g.words(), ci * plane, (ci + 1) * plane, [&](int64_t j) {
        const int64_t rem = j - ci * plane;
        const int64_t p = conv::tap_output(g, rem / g.w, rem % g.w, ky, kx);
        if (p >= 0) acc += gs[p * g.cout];
      });
    }
    part[q] = acc;
  }
}

// out[i] = the chunks' partial sums of entry i added in chunk order, from zero or from chunk 0
// (as the CPU: db from zero, dW from chunk 0).
template <typename scalar_t>
__global__ void chunk_sum_kernel(const scalar_t* __restrict__ part, int64_t chunks, int64_t size,
                                 bool from_zero, scalar_t* __restrict__ out) {
  SG_KERNEL_LOOP(i, size) {
    scalar_t v = from_zero ? scalar_t(0) + part[i] : part[i];
    for (int64_t chunk = 1; chunk < chunks; ++chunk) v += part[chunk * size + i];
    out[i] = v;
  }
}

// dx at the producer's active set: one thread per entry e (row[e] from prepare_csr, -1: skipped),
// writing dx[s][j] of its sample s; the other entries of dx stay zero.
template <typename scalar_t>
__global__ void conv_dx_kernel(const int32_t* __restrict__ idx, const int64_t* __restrict__ row,
                               int64_t n_entries, const scalar_t* __restrict__ wt,
                               const scalar_t* __restrict__ gcl, const bool* __restrict__ any,
                               conv::ConvGeom g, int64_t batch, int64_t steps,
                               scalar_t* __restrict__ dx) {
  const int64_t plane = g.h * g.w;
  SG_KERNEL_LOOP(e, n_entries) {
    const int64_t r = row[e];
    if (r < 0) continue;
    const int64_t s = conv::sample_of_csr_row(r, batch, steps);
    if (!any[s]) continue;  // as the CPU: a sample without gradient has dx = 0
    const int64_t j = idx[e], ci = j / plane, rem = j % plane;
    dx[s * g.in_size() + j] = conv::dx_dot(g, ci, rem / g.w, rem % g.w, wt + ci * g.taps() * g.cout_g,
                                           gcl + s * g.npos() * g.cout);
  }
}

}  // namespace cuda
}  // namespace sparsegrad
