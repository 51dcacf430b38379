// Convolutions of spike sequences on the CPU (issue 20): conv2d -> (max / avg pool) whose input is
// binary spikes, folded over time into one batch of N = T*B samples (sample n = t*B + b).
//
// Forward by events: x is packed into bits once (spike_pack: one pass that also counts the
// nonzeros and checks that x is binary); each sample's set bits then add weight rows
// Wt[ci][ky][kx][:] (over the output channels of ci's group, contiguous, so the adds vectorise)
// into a channels-last buffer of the sample's conv output, which stays in L1/L2; the bias and
// the pooling are applied from that buffer, and max pooling records the winner's offset inside
// its window as uint8. Work: nnz(x) * KH*KW * Cout/groups adds instead of the dense
// N * Cout * Ho*Wo * Cin/groups * KH*KW multiply-adds.
//
// Backward: per sample, the pooled gradient is unpooled into a channels-last buffer (max pooling:
// one position per window), then
//   dW[co, ci, ky, kx] = sum over input events (ci, iy, ix) of g[oy, ox, co]   (bits, no floats)
//   db[co]             = sum of g
//   dx[ci, iy, ix]     = sum_{ky,kx,co} W[co, ci, ky, kx] g[oy, ox, co]  only at the producer's
//                        active set (the neuron that made x reads dx nowhere else); without one
//                        the caller gets the unpooled gradient and takes ATen's dense dx.
// dW and db are summed per fixed chunk of samples (at most 8, independent of the thread count)
// and the chunks added in order: bit-identical results whatever the number of threads.
#include <torch/library.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define SG_CONV_AVX512 1
#include <immintrin.h>
#endif

#include "conv_geom.h"
#include "conv_math.h"

#if defined(__GNUC__)
#define SG_CONV_UNROLL _Pragma("GCC unroll 16")
#else
#define SG_CONV_UNROLL
#endif

namespace sparsegrad {
namespace cpu {
namespace {

using namespace conv;  // ConvGeom, the pool kinds, the shared per-element math

// Wt[ci][ky][kx][c] = W[group(ci)*cout_g + c][ci % cin_g][ky][kx]: the output channels an input
// event feeds, contiguous.
template <typename scalar_t>
std::vector<scalar_t> transpose_weight(const at::Tensor& weight, const ConvGeom& g) {
  std::vector<scalar_t> wt(static_cast<size_t>(g.cin * g.taps() * g.cout_g));
  const scalar_t* w = weight.data_ptr<scalar_t>();
  for (int64_t ci = 0; ci < g.cin; ++ci) {
    const int64_t gi = ci / g.cin_g, cl = ci % g.cin_g;
    for (int64_t k = 0; k < g.taps(); ++k)
      for (int64_t c = 0; c < g.cout_g; ++c)
        wt[(ci * g.taps() + k) * g.cout_g + c] =
            w[((gi * g.cout_g + c) * g.cin_g + cl) * g.taps() + k];
  }
  return wt;
}

// dst[0..n) += src[0..n): fixed-length bodies for the usual channel counts (no runtime checks,
// fully unrolled vector adds), a plain loop otherwise.
template <int64_t n, typename scalar_t>
inline void add_fixed(scalar_t* __restrict__ dst, const scalar_t* __restrict__ src) {
  typedef scalar_t vec_t __attribute__((vector_size(64)));
  constexpr int64_t L = 64 / sizeof(scalar_t);
  if constexpr (n % L == 0) {
    SG_CONV_UNROLL
    for (int64_t c = 0; c < n; c += L) {
      vec_t a, b;
      __builtin_memcpy(&a, dst + c, sizeof(vec_t));
      __builtin_memcpy(&b, src + c, sizeof(vec_t));
      a += b;
      __builtin_memcpy(dst + c, &a, sizeof(vec_t));
    }
  } else {
    SG_CONV_UNROLL
    for (int64_t c = 0; c < n; ++c) dst[c] += src[c];
  }
}

template <typename scalar_t>
inline void add_row(int64_t n, scalar_t* __restrict__ dst, const scalar_t* __restrict__ src) {
  switch (n) {
    case 8: return add_fixed<8>(dst, src);
    case 16: return add_fixed<16>(dst, src);
    case 32: return add_fixed<32>(dst, src);
    case 64: return add_fixed<64>(dst, src);
    case 128: return add_fixed<128>(dst, src);
    default:
      for (int64_t c = 0; c < n; ++c) dst[c] += src[c];
  }
}

// Bias and pooling from a channels-last conv output buf[p][co] into out[co][py][px] (NCHW),
// with max pooling's winner offset (ky*pk + kx in the window, first maximum as ATen) in idx.
// Channels innermost, so each window's comparisons run over contiguous rows of buf.
template <typename scalar_t>
void pool_from_cl(const scalar_t* buf, const scalar_t* bias, const ConvGeom& g, scalar_t* out,
                  uint8_t* idx, scalar_t* __restrict__ best, uint8_t* __restrict__ arg) {
  const int64_t pk = g.pk, cout = g.cout, plane = g.hp * g.wp;
  const scalar_t inv = scalar_t(1) / static_cast<scalar_t>(pk * pk);
  if (g.pool == kPoolNone) {  // a transpose in tiles of 16 positions: whole-line stores per channel
    constexpr int64_t kTile = 16;
    for (int64_t o0 = 0; o0 < plane; o0 += kTile) {
      const int64_t m = std::min(kTile, plane - o0);
      const scalar_t* __restrict__ rows = buf + o0 * cout;
      for (int64_t co = 0; co < cout; ++co) {
        const scalar_t add = bias ? bias[co] : scalar_t(0);
        scalar_t* __restrict__ dst = out + co * plane + o0;
        for (int64_t i = 0; i < m; ++i) dst[i] = rows[i * cout + co] + add;
      }
    }
    return;
  }
  for (int64_t py = 0; py < g.hp; ++py)
    for (int64_t px = 0; px < g.wp; ++px) {
      const int64_t o = py * g.wp + px;
      for (int64_t co = 0; co < cout; ++co) {
        best[co] = g.pool == kPoolMax ? -std::numeric_limits<scalar_t>::infinity() : scalar_t(0);
        arg[co] = 0;
      }
      for (int64_t a = 0; a < pk; ++a)
        for (int64_t c = 0; c < pk; ++c) {
          const scalar_t* __restrict__ row = buf + ((py * pk + a) * g.wo + px * pk + c) * cout;
          const uint8_t slot = static_cast<uint8_t>(a * pk + c);
          if (g.pool == kPoolMax) {
            for (int64_t co = 0; co < cout; ++co) {
              const scalar_t v = row[co] + (bias ? bias[co] : scalar_t(0));
              const bool take = pool_takes(v, best[co]);
              best[co] = take ? v : best[co];
              arg[co] = take ? slot : arg[co];
            }
          } else {
            for (int64_t co = 0; co < cout; ++co) best[co] += row[co] + (bias ? bias[co] : scalar_t(0));
          }
        }
      for (int64_t co = 0; co < cout; ++co) {
        out[co * plane + o] = g.pool == kPoolMax ? best[co] : best[co] * inv;
        if (g.pool == kPoolMax) idx[co * plane + o] = arg[co];
      }
    }
}

// One sample's conv output by gathering (groups == 1, C_in <= 64, C_out = NV whole vectors):
// mask[pos] holds the channels that spiked at input position pos; each output position sums the
// weight rows of the spikes under its taps in NV vector registers and stores them once (no
// read-modify-write of the output per event). Order: taps ascending, channels ascending.
template <typename scalar_t, int NV>
void gather_sample(const ConvGeom& g, const uint64_t* mask, const scalar_t* wt, scalar_t* buf) {
  typedef scalar_t vec_t __attribute__((vector_size(64)));
  constexpr int64_t L = 64 / sizeof(scalar_t);
  for (int64_t oy = 0; oy < g.ho; ++oy)
    for (int64_t ox = 0; ox < g.wo; ++ox) {
      vec_t acc[NV];
      for (int v = 0; v < NV; ++v) acc[v] = vec_t{} ;
      for_each_input_tap(g, oy, ox, [&](int64_t k, int64_t iy, int64_t ix) {
        uint64_t m = mask[iy * g.w + ix];
        const scalar_t* wk = wt + k * g.cout;
        while (m) {
          const int64_t ci = __builtin_ctzll(m);
          m &= m - 1;
          const scalar_t* wr = wk + ci * g.taps() * g.cout;
          for (int v = 0; v < NV; ++v) {
            vec_t w;
            __builtin_memcpy(&w, wr + v * L, sizeof(vec_t));
            acc[v] += w;
          }
        }
      });
      scalar_t* dst = buf + (oy * g.wo + ox) * g.cout;
      for (int v = 0; v < NV; ++v) __builtin_memcpy(dst + v * L, &acc[v], sizeof(vec_t));
    }
}

// The same sum by scattering, for samples with few events (gathering visits every output
// position and tap whatever the events): for each tap k ascending, every event (ascending: channel,
// then position) adds Wt[ci][k] to the output position that tap lands on. Each output position
// thus receives its terms in gather_sample's order (taps, then channels), starting from zero:
// the same bits (the CUDA kernel gathers). buf must be zeroed; events: the sample's input
// entries j = ci*H*W + iy*W + ix, ascending.
template <typename scalar_t, int NV>
void scatter_sample(const ConvGeom& g, const int32_t* events, int64_t count, const scalar_t* wt,
                    scalar_t* buf, std::vector<int32_t>& decoded) {
  typedef scalar_t vec_t __attribute__((vector_size(64)));
  constexpr int64_t L = 64 / sizeof(scalar_t);
  const int64_t hw = g.h * g.w;
  decoded.resize(static_cast<size_t>(3 * count));  // (ci, iy, ix) per event, decoded once
  for (int64_t e = 0; e < count; ++e) {
    const int64_t j = events[e], ci = j / hw, rem = j - ci * hw, iy = rem / g.w;
    decoded[3 * e] = static_cast<int32_t>(ci);
    decoded[3 * e + 1] = static_cast<int32_t>(iy);
    decoded[3 * e + 2] = static_cast<int32_t>(rem - iy * g.w);
  }
  for (int64_t ky = 0; ky < g.kh; ++ky)
    for (int64_t kx = 0; kx < g.kw; ++kx) {
      const int64_t k = ky * g.kw + kx;
      for (int64_t e = 0; e < count; ++e) {
        const int32_t* d = decoded.data() + 3 * e;
        const int64_t p = tap_output(g, d[1], d[2], ky, kx);
        if (p < 0) continue;
        const scalar_t* wr = wt + (d[0] * g.taps() + k) * g.cout;
        scalar_t* dst = buf + p * g.cout;
        for (int v = 0; v < NV; ++v) {
          vec_t a, w;
          __builtin_memcpy(&a, dst + v * L, sizeof(vec_t));
          __builtin_memcpy(&w, wr + v * L, sizeof(vec_t));
          a += w;
          __builtin_memcpy(dst + v * L, &a, sizeof(vec_t));
        }
      }
    }
}

// A sample is scattered below this many events per input position (measured on the DVS and
// tutorial nets: scattering costs per event and tap, gathering per output position and tap).
constexpr int64_t kScatterEventsPerPosition = 2;

template <typename scalar_t>
struct TapsMajorFns {
  void (*gather)(const ConvGeom&, const uint64_t*, const scalar_t*, scalar_t*) = nullptr;
  void (*scatter)(const ConvGeom&, const int32_t*, int64_t, const scalar_t*, scalar_t*,
                  std::vector<int32_t>&) = nullptr;
};

template <typename scalar_t>
TapsMajorFns<scalar_t> pick_taps_major(const ConvGeom& g) {
  constexpr int64_t L = 64 / sizeof(scalar_t);
  if (!forward_taps_major(g.groups, g.cin, g.cout, sizeof(scalar_t))) return {};
  switch (g.cout / L) {
    case 1: return {&gather_sample<scalar_t, 1>, &scatter_sample<scalar_t, 1>};
    case 2: return {&gather_sample<scalar_t, 2>, &scatter_sample<scalar_t, 2>};
    case 3: return {&gather_sample<scalar_t, 3>, &scatter_sample<scalar_t, 3>};
    case 4: return {&gather_sample<scalar_t, 4>, &scatter_sample<scalar_t, 4>};
    case 6: return {&gather_sample<scalar_t, 6>, &scatter_sample<scalar_t, 6>};
    case 8: return {&gather_sample<scalar_t, 8>, &scatter_sample<scalar_t, 8>};
    default: return {};
  }
}

// x [N, M] (any float) -> bits [N, ceil(M/32)] int32 (bit j%32 of word j/32 = x[n, j] != 0),
// info int64 [2] = (nonzeros, entries that are neither 0 nor 1).
std::tuple<at::Tensor, at::Tensor> spike_pack_cpu(const at::Tensor& x_in) {
  check_pack_input(x_in);
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.size(0), m = x.size(1), words = (m + 31) / 32;
  at::Tensor bits = at::empty({n, words}, x.options().dtype(at::kInt));
  std::vector<int64_t> nnz(std::max<int64_t>(n, 1), 0), odd(std::max<int64_t>(n, 1), 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spike_pack", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    int32_t* bp = bits.data_ptr<int32_t>();
    at::parallel_for(0, n, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t r = n0; r < n1; ++r) {
        const scalar_t* row = xp + r * m;
        int64_t cnt = 0, bad = 0;
        for (int64_t wd = 0; wd < words; ++wd) {
          const uint32_t word = pack_word(row, m, wd, &bad);
          cnt += popcount32(word);
          bp[r * words + wd] = static_cast<int32_t>(word);
        }
        nnz[r] = cnt;
        odd[r] = bad;
      }
    });
  });
  int64_t total = 0, bad = 0;
  for (int64_t r = 0; r < n; ++r) total += nnz[r], bad += odd[r];
  at::Tensor info = at::empty({2}, x.options().dtype(at::kLong));
  info[0] = total;
  info[1] = bad;
  return {bits, info};
}

std::tuple<at::Tensor, at::Tensor> spike_conv2d_forward_cpu(
    const at::Tensor& bits_in, const at::Tensor& weight_in, const c10::optional<at::Tensor>& bias_in,
    at::IntArrayRef in_shape, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, c10::string_view pool, int64_t pool_k) {
  const ConvGeom g = make_geom(weight_in, in_shape, stride, padding, dilation, groups, pool, pool_k);
  check_bits(bits_in, g, -1, weight_in);
  check_bias(bias_in, g, weight_in);
  const at::Tensor bits = bits_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const int64_t n = bits.size(0);
  at::Tensor out = at::empty({n, g.cout, g.hp, g.wp}, weight.options());
  at::Tensor idx = g.pool == kPoolMax ? at::empty({n, g.cout, g.hp, g.wp}, weight.options().dtype(at::kByte))
                                      : at::empty({0}, weight.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "spike_conv2d_forward", [&] {
    const std::vector<scalar_t> wt = transpose_weight<scalar_t>(weight, g);
    const int32_t* bp = bits.data_ptr<int32_t>();
    const scalar_t* bias_p = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    uint8_t* ip = g.pool == kPoolMax ? idx.data_ptr<uint8_t>() : nullptr;
    const int64_t plane = g.cout * g.hp * g.wp;
    const TapsMajorFns<scalar_t> taps_major = pick_taps_major<scalar_t>(g);
    const int64_t hw = g.h * g.w;
    at::parallel_for(0, n, 1, [&](int64_t n0, int64_t n1) {
      std::vector<scalar_t> buf(static_cast<size_t>(g.ho * g.wo * g.cout));
      std::vector<scalar_t> best(static_cast<size_t>(g.cout));
      std::vector<uint8_t> arg(static_cast<size_t>(g.cout));
      std::vector<uint64_t> mask(static_cast<size_t>(taps_major.gather ? hw : 0));
      std::vector<int32_t> events, decoded;
      for (int64_t s = n0; s < n1; ++s) {
        scalar_t* __restrict__ b = buf.data();
        if (taps_major.gather) {  // gather or scatter, the same order of additions
          events.clear();
          for_each_event(bp + s * g.words(), 0, g.in_size(),
                         [&](int64_t j) { events.push_back(static_cast<int32_t>(j)); });
          const int64_t count = static_cast<int64_t>(events.size());
          if (count < kScatterEventsPerPosition * hw) {
            std::fill(buf.begin(), buf.end(), scalar_t(0));
            taps_major.scatter(g, events.data(), count, wt.data(), b, decoded);
          } else {
            std::fill(mask.begin(), mask.end(), uint64_t(0));
            for (const int32_t j : events) mask[j % hw] |= uint64_t(1) << (j / hw);
            taps_major.gather(g, mask.data(), wt.data(), b);
          }
          pool_from_cl(b, bias_p, g, op + s * plane, ip ? ip + s * plane : nullptr, best.data(),
                       arg.data());
          continue;
        }
        std::fill(buf.begin(), buf.end(), scalar_t(0));
        for_each_event(bp + s * g.words(), 0, g.in_size(), [&](int64_t j) {
          const int64_t ci = j / (g.h * g.w), rem = j % (g.h * g.w);
          const int64_t c0 = (ci / g.cin_g) * g.cout_g;
          const scalar_t* wrow = wt.data() + ci * g.taps() * g.cout_g;
          for_each_tap(g, rem / g.w, rem % g.w, [&](int64_t k, int64_t p) {
            add_row(g.cout_g, b + p * g.cout + c0, wrow + k * g.cout_g);
          });
        });
        pool_from_cl(b, bias_p, g, op + s * plane, ip ? ip + s * plane : nullptr, best.data(),
                     arg.data());
      }
    });
  });
  return {out, idx};
}

#if defined(SG_CONV_AVX512)
// Masks for 16 windows of a 2x2 pooling row from window px on, `left` = windows still to go
// (rows narrower than 16 windows, and a row's last ones): keep, one lane per window; lo / hi,
// the two 16-float halves of the row's 32 values.
struct WindowMasks {
  __mmask16 keep, lo, hi;
};
inline WindowMasks window_masks(int64_t left) {
  left = std::min<int64_t>(16, left);
  return {left == 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1),
          left >= 8 ? __mmask16(0xffff) : __mmask16((1u << (2 * left)) - 1),
          left <= 8 ? __mmask16(0) : __mmask16((1u << (2 * (left - 8))) - 1)};
}
#endif

// 2x2 max pooling of one pair of float rows, 16 windows at a time (AVX-512): the same rule and
// winner as the scalar loop (pool_takes: a greater value or a NaN takes over, in window order).
// Returns how many windows it pooled (all, or none for other types or without AVX-512); the
// caller pools the rest.
template <typename scalar_t>
inline int64_t max_pool2_rows16(const scalar_t*, const scalar_t*, int64_t, scalar_t*, uint8_t*) {
  return 0;
}

inline int64_t max_pool2_rows16(const float* r0, const float* r1, int64_t wp, float* out,
                                uint8_t* arg_out) {
#if defined(SG_CONV_AVX512)
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  for (int64_t px = 0; px < wp; px += 16) {
    const WindowMasks m = window_masks(wp - px);  // the row's last windows masked
    const __mmask16 lo = m.lo, hi = m.hi, keep = m.keep;
    const __m512 a0 = _mm512_maskz_loadu_ps(lo, r0 + 2 * px), a1 = _mm512_maskz_loadu_ps(hi, r0 + 2 * px + 16);
    const __m512 b0 = _mm512_maskz_loadu_ps(lo, r1 + 2 * px), b1 = _mm512_maskz_loadu_ps(hi, r1 + 2 * px + 16);
    const __m512 v[4] = {_mm512_permutex2var_ps(a0, even, a1), _mm512_permutex2var_ps(a0, odd, a1),
                         _mm512_permutex2var_ps(b0, even, b1), _mm512_permutex2var_ps(b0, odd, b1)};
    __m512 best = v[0];
    __m512i arg = _mm512_setzero_si512();
    for (int k = 1; k < 4; ++k) {
      const __mmask16 take = _mm512_cmp_ps_mask(v[k], best, _CMP_GT_OQ) |
                             _mm512_cmp_ps_mask(v[k], v[k], _CMP_UNORD_Q);
      best = _mm512_mask_mov_ps(best, take, v[k]);
      arg = _mm512_mask_mov_epi32(arg, take, _mm512_set1_epi32(k));
    }
    _mm512_mask_storeu_ps(out + px, keep, best);
    _mm_mask_storeu_epi8(arg_out + px, keep, _mm512_cvtepi32_epi8(arg));
  }
  return wp;
#else
  (void)r0, (void)r1, (void)wp, (void)out, (void)arg_out;
  return 0;
#endif
}

// Its backward for one pair of float rows: each window's gradient to its winner, zeros elsewhere,
// 16 windows at a time (AVX-512; masked for the last ones). Returns how many windows it did
// (all, or none without AVX-512); *worst receives the largest winner offset seen.
template <typename scalar_t>
inline int64_t max_unpool2_rows16(const scalar_t*, const uint8_t*, int64_t, scalar_t*, scalar_t*,
                                  uint8_t*) {
  return 0;
}

inline int64_t max_unpool2_rows16(const float* g, const uint8_t* slots, int64_t wp, float* r0,
                                  float* r1, uint8_t* worst) {
#if defined(SG_CONV_AVX512)
  const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
  __m128i top = _mm_setzero_si128();
  for (int64_t px = 0; px < wp; px += 16) {
    const WindowMasks m = window_masks(wp - px);
    const __mmask16 lo = m.lo, hi = m.hi, keep = m.keep;
    const __m512 v = _mm512_maskz_loadu_ps(keep, g + px);
    const __m128i s8 = _mm_maskz_loadu_epi8(keep, slots + px);
    top = _mm_max_epu8(top, s8);
    const __m512i s = _mm512_cvtepu8_epi32(s8);
    __m512 e[4];
    for (int k = 0; k < 4; ++k)
      e[k] = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(s, _mm512_set1_epi32(k)), v);
    _mm512_mask_storeu_ps(r0 + 2 * px, lo, _mm512_permutex2var_ps(e[0], first, e[1]));
    _mm512_mask_storeu_ps(r0 + 2 * px + 16, hi, _mm512_permutex2var_ps(e[0], second, e[1]));
    _mm512_mask_storeu_ps(r1 + 2 * px, lo, _mm512_permutex2var_ps(e[2], first, e[3]));
    _mm512_mask_storeu_ps(r1 + 2 * px + 16, hi, _mm512_permutex2var_ps(e[2], second, e[3]));
  }
  alignas(16) uint8_t lanes[16];
  _mm_store_si128(reinterpret_cast<__m128i*>(lanes), top);
  for (int l = 0; l < 16; ++l) *worst = std::max(*worst, lanes[l]);
  return wp;
#else
  (void)g, (void)slots, (void)wp, (void)r0, (void)r1, (void)worst;
  return 0;
#endif
}

// Pooling of a dense conv output y [N, C, Ho, Wo] (the dense route): out [N, C, Ho/k, Wo/k] and
// max pooling's uint8 winner offsets.
std::tuple<at::Tensor, at::Tensor> conv_pool2d_cpu(const at::Tensor& y_in, c10::string_view pool,
                                                   int64_t pool_k) {
  const int kind = check_pool_input(y_in, pool, pool_k, "conv_pool2d");
  const at::Tensor y = y_in.contiguous();
  const int64_t n = y.size(0), c = y.size(1), ho = y.size(2), wo = y.size(3);
  const int64_t hp = ho / pool_k, wp = wo / pool_k;
  at::Tensor out = at::empty({n, c, hp, wp}, y.options());
  at::Tensor idx = kind == kPoolMax ? at::empty({n, c, hp, wp}, y.options().dtype(at::kByte))
                                    : at::empty({0}, y.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "conv_pool2d", [&] {
    const scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    uint8_t* ip = kind == kPoolMax ? idx.data_ptr<uint8_t>() : nullptr;
    at::parallel_for(0, n * c, 16, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        const scalar_t* src = yp + q * ho * wo;
        if (kind == kPoolMax && pool_k == 2) {
          // The common 2x2 case with the window unrolled (pool_window's rule: starting from the
          // first value is the same as from -inf).
          for (int64_t py = 0; py < hp; ++py) {
            const scalar_t* r0 = src + 2 * py * wo;
            const scalar_t* r1 = r0 + wo;
            scalar_t* o = op + (q * hp + py) * wp;
            uint8_t* oi = ip + (q * hp + py) * wp;
            int64_t px = 0;
            px = max_pool2_rows16(r0, r1, wp, o, oi);
            for (; px < wp; ++px) {
              scalar_t best = r0[2 * px];
              uint8_t arg = 0;
              const scalar_t v1 = r0[2 * px + 1], v2 = r1[2 * px], v3 = r1[2 * px + 1];
              const bool t1 = pool_takes(v1, best);
              best = t1 ? v1 : best;
              arg = t1 ? uint8_t(1) : arg;
              const bool t2 = pool_takes(v2, best);
              best = t2 ? v2 : best;
              arg = t2 ? uint8_t(2) : arg;
              const bool t3 = pool_takes(v3, best);
              best = t3 ? v3 : best;
              arg = t3 ? uint8_t(3) : arg;
              o[px] = best;
              oi[px] = arg;
            }
          }
          continue;
        }
        for (int64_t py = 0; py < hp; ++py)
          for (int64_t px = 0; px < wp; ++px) {
            const int64_t o = (q * hp + py) * wp + px;
            uint8_t arg = 0;
            op[o] = pool_window(src, wo, py, px, pool_k, kind, &arg);
            if (kind == kPoolMax) ip[o] = arg;
          }
      }
    });
  });
  return {out, idx};
}

// The backward of conv_pool2d: grad [N, C, Hp, Wp] -> [N, C, H, W] (max: to each window's
// winner, pool_idx as conv_pool2d returned it; avg: 1/k^2 to every position of the window;
// positions outside every window get zero). Each output plane is written once, in order.
at::Tensor conv_unpool2d_cpu(const at::Tensor& grad_in, const at::Tensor& pool_idx_in,
                             c10::string_view pool, int64_t pool_k, int64_t h, int64_t w) {
  const int kind = check_unpool_args(grad_in, pool_idx_in, pool, pool_k, h, w);
  const at::Tensor grad = grad_in.contiguous();
  const int64_t n = grad.size(0), c = grad.size(1), hp = grad.size(2), wp = grad.size(3);
  at::Tensor idx;
  // 2x2 max pooling over whole windows: every output written once, row pair by row pair (no
  // zero fill first), the winner offsets checked on the way
  const bool pairs = kind == kPoolMax && pool_k == 2 && h == 2 * hp && w == 2 * wp;
  if (kind == kPoolMax) {
    idx = pool_idx_in.contiguous();
    TORCH_CHECK(pairs || idx.numel() == 0 || idx.max().item<int64_t>() < pool_k * pool_k,
                "pool_idx entries must lie in [0, pool_k**2 = ", pool_k * pool_k, ")");
  }
  std::atomic<bool> bad_slot{false};
  at::Tensor out = at::empty({n, c, h, w}, grad.options());
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "conv_unpool2d", [&] {
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const uint8_t* ip = kind == kPoolMax ? idx.data_ptr<uint8_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t inv = scalar_t(1) / static_cast<scalar_t>(pool_k * pool_k);
    at::parallel_for(0, n * c, 16, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        scalar_t* dst = op + q * h * w;
        const scalar_t* src = gp + q * hp * wp;
        if (pairs) {
          const uint8_t* slots = ip + q * hp * wp;
          uint8_t worst = 0;
          for (int64_t py = 0; py < hp; ++py) {
            scalar_t* r0 = dst + 2 * py * w;
            scalar_t* r1 = r0 + w;
            for (int64_t px = max_unpool2_rows16(src + py * wp, slots + py * wp, wp, r0, r1, &worst);
                 px < wp; ++px) {
              const scalar_t v = src[py * wp + px];
              const uint8_t slot = slots[py * wp + px];
              worst = std::max(worst, slot);
              r0[2 * px] = slot == 0 ? v : scalar_t(0);
              r0[2 * px + 1] = slot == 1 ? v : scalar_t(0);
              r1[2 * px] = slot == 2 ? v : scalar_t(0);
              r1[2 * px + 1] = slot == 3 ? v : scalar_t(0);
            }
          }
          if (worst > 3) bad_slot = true;
          continue;
        }
        std::fill(dst, dst + h * w, scalar_t(0));
        for (int64_t py = 0; py < hp; ++py)
          for (int64_t px = 0; px < wp; ++px) {
            const scalar_t v = src[py * wp + px];
            if (kind == kPoolMax) {
              const int64_t slot = ip[q * hp * wp + py * wp + px];
              dst[(py * pool_k + slot / pool_k) * w + px * pool_k + slot % pool_k] = v;
            } else {
              for (int64_t a = 0; a < pool_k; ++a)
                for (int64_t b = 0; b < pool_k; ++b) dst[(py * pool_k + a) * w + px * pool_k + b] = v * inv;
            }
          }
      }
    });
  });
  TORCH_CHECK(!bad_slot, "pool_idx entries must lie in [0, pool_k**2 = ", pool_k * pool_k, ")");
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> spike_conv2d_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& pool_idx_in, const c10::optional<at::Tensor>& bits_opt,
    const at::Tensor& weight_in, at::IntArrayRef in_shape, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, c10::string_view pool,
    int64_t pool_k, const c10::optional<at::Tensor>& prev_cnt_opt,
    const c10::optional<at::Tensor>& prev_idx_opt, int64_t num_steps, bool need_dx, bool need_dw,
    bool need_db, bool need_grad_conv) {
  const ConvGeom g = make_geom(weight_in, in_shape, stride, padding, dilation, groups, pool, pool_k);
  check_backward_args(grad_in, pool_idx_in, bits_opt, weight_in, g, need_dw);
  const at::Tensor grad = grad_in.contiguous(), weight = weight_in.contiguous();
  const int64_t n = grad.size(0);
  at::Tensor pool_idx;
  if (g.pool == kPoolMax) {
    pool_idx = pool_idx_in.contiguous();
    TORCH_CHECK(pool_idx.numel() == 0 || pool_idx.max().item<int64_t>() < g.pk * g.pk,
                "pool_idx entries must lie in [0, pool_k**2 = ", g.pk * g.pk, ")");
  }
  at::Tensor bits;
  if (need_dw) bits = bits_opt->contiguous();
  at::Tensor prev_cnt, prev_idx;
  std::vector<int64_t> prev_off;
  int64_t batch = 0;
  if (need_dx) {
    batch = check_producer_set(prev_cnt_opt, prev_idx_opt, n, num_steps, weight);
    prev_cnt = prev_cnt_opt->to(at::kInt).contiguous();
    prev_idx = prev_idx_opt->to(at::kInt).contiguous();
    prev_off.assign(n + 1, 0);
    const int32_t* cp = prev_cnt.data_ptr<int32_t>();
    for (int64_t r = 0; r < n; ++r) {
      TORCH_CHECK(cp[r] >= 0 && cp[r] <= g.in_size(), "prev_cnt entries must lie in [0, ",
                  g.in_size(), "]");
      prev_off[r + 1] = prev_off[r] + cp[r];
    }
    TORCH_CHECK(prev_off[n] == prev_idx.numel(), "prev_cnt must add up to prev_idx's length");
    const int32_t* ix = prev_idx.data_ptr<int32_t>();
    for (int64_t e = 0; e < prev_off[n]; ++e)
      TORCH_CHECK(ix[e] >= 0 && ix[e] < g.in_size(), "prev_idx entries must lie in [0, ",
                  g.in_size(), ")");
  }
  const auto opts = weight.options();
  at::Tensor dx = need_dx ? at::empty({n, g.cin, g.h, g.w}, opts) : at::empty({0}, opts);
  at::Tensor gc = need_grad_conv ? at::empty({n, g.cout, g.ho, g.wo}, opts) : at::empty({0}, opts);
  at::Tensor dw = need_dw ? at::empty_like(weight) : at::empty({0}, opts);
  at::Tensor db = need_db ? at::empty({g.cout}, opts) : at::empty({0}, opts);
  const int64_t chunks = grad_chunks(n);
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "spike_conv2d_backward", [&] {
    const std::vector<scalar_t> wt = transpose_weight<scalar_t>(weight, g);
    const int64_t wsize = g.cin * g.taps() * g.cout_g;
    std::vector<scalar_t> dwt(static_cast<size_t>(need_dw ? chunks * wsize : 0), scalar_t(0));
    std::vector<scalar_t> dbp(static_cast<size_t>(need_db ? chunks * g.cout : 0), scalar_t(0));
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const uint8_t* ip = g.pool == kPoolMax ? pool_idx.data_ptr<uint8_t>() : nullptr;
    const int32_t* bp = need_dw ? bits.data_ptr<int32_t>() : nullptr;
    const int32_t* pix = need_dx ? prev_idx.data_ptr<int32_t>() : nullptr;
    scalar_t* dxp = need_dx ? dx.data_ptr<scalar_t>() : nullptr;
    scalar_t* gcp = need_grad_conv ? gc.data_ptr<scalar_t>() : nullptr;
    const int64_t plane = g.cout * g.hp * g.wp, npos = g.ho * g.wo;
    const scalar_t avg_scale = scalar_t(1) / static_cast<scalar_t>(g.pk * g.pk);
    // Window slot a*pk + c -> offset a*wo + c of the conv output position.
    std::vector<int64_t> win_off(static_cast<size_t>(g.pk * g.pk));
    for (int64_t a = 0; a < g.pk; ++a)
      for (int64_t c = 0; c < g.pk; ++c) win_off[a * g.pk + c] = a * g.wo + c;
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      std::vector<scalar_t> buf(static_cast<size_t>(npos * g.cout));
      for (int64_t chunk = c0; chunk < c1; ++chunk) {
        scalar_t* __restrict__ dwc = need_dw ? dwt.data() + chunk * wsize : nullptr;
        scalar_t* dbc = need_db ? dbp.data() + chunk * g.cout : nullptr;
        const int64_t s0 = chunk_begin(chunk, n, chunks), s1 = chunk_begin(chunk + 1, n, chunks);
        for (int64_t s = s0; s < s1; ++s) {
          // Unpool the sample's gradient into buf[p][co].
          scalar_t* __restrict__ b = buf.data();
          const scalar_t* gs = gp + s * plane;
          bool any = false;
          if (g.pool == kPoolNone) {
            // every position written: no fill; a transpose in tiles of 16 positions, so that the
            // stores stay within a few lines of buf
            constexpr int64_t kTile = 16;
            for (int64_t p0 = 0; p0 < npos; p0 += kTile) {
              const int64_t m = std::min(kTile, npos - p0);
              scalar_t* __restrict__ rows = b + p0 * g.cout;
              for (int64_t co = 0; co < g.cout; ++co) {
                const scalar_t* __restrict__ src = gs + co * npos + p0;
                bool nz = false;
                for (int64_t i = 0; i < m; ++i) {
                  rows[i * g.cout + co] = src[i];
                  nz |= src[i] != scalar_t(0);
                }
                any |= nz;
              }
            }
          } else {
            std::fill(buf.begin(), buf.end(), scalar_t(0));
          }
          for (int64_t co = 0; co < (g.pool == kPoolNone ? 0 : g.cout); ++co)
            for (int64_t py = 0; py < g.hp; ++py)
              for (int64_t px = 0; px < g.wp; ++px) {
                const int64_t o = (co * g.hp + py) * g.wp + px;
                const scalar_t v = gs[o];
                if (v == scalar_t(0)) continue;
                any = true;
                if (g.pool == kPoolMax) {
                  b[((py * g.pk) * g.wo + px * g.pk + win_off[ip[s * plane + o]]) * g.cout + co] = v;
                } else {
                  for (int64_t a = 0; a < g.pk; ++a)
                    for (int64_t c = 0; c < g.pk; ++c)
                      b[((py * g.pk + a) * g.wo + px * g.pk + c) * g.cout + co] = v * avg_scale;
                }
              }
          if (gcp) {
            scalar_t* dst = gcp + s * g.cout * npos;
            for (int64_t p = 0; p < npos; ++p)
              for (int64_t co = 0; co < g.cout; ++co) dst[co * npos + p] = b[p * g.cout + co];
          }
          if (dxp) std::fill(dxp + s * g.in_size(), dxp + (s + 1) * g.in_size(), scalar_t(0));
          if (!any) continue;  // a sample whose neurons are inactive from here on: no work
          if (dbc)
            for (int64_t p = 0; p < npos; ++p)
              for (int64_t co = 0; co < g.cout; ++co) dbc[co] += b[p * g.cout + co];
          if (dwc) {
            for_each_event(bp + s * g.words(), 0, g.in_size(), [&](int64_t j) {
              const int64_t ci = j / (g.h * g.w), rem = j % (g.h * g.w);
              const int64_t c0 = (ci / g.cin_g) * g.cout_g;
              scalar_t* drow = dwc + ci * g.taps() * g.cout_g;
              for_each_tap(g, rem / g.w, rem % g.w, [&](int64_t k, int64_t p) {
                add_row(g.cout_g, drow + k * g.cout_g, b + p * g.cout + c0);
              });
            });
          }
          if (dxp) {
            const int64_t row = csr_row_of_sample(s, batch, num_steps);
            scalar_t* dxs = dxp + s * g.in_size();
            for (int64_t e = prev_off[row]; e < prev_off[row + 1]; ++e) {
              const int64_t j = pix[e];
              const int64_t ci = j / (g.h * g.w), rem = j % (g.h * g.w);
              dxs[j] = dx_dot(g, ci, rem / g.w, rem % g.w, wt.data() + ci * g.taps() * g.cout_g, b);
            }
          }
        }
      }
    });
    if (need_dw) {
      for (int64_t chunk = 1; chunk < chunks; ++chunk)
        for (int64_t q = 0; q < wsize; ++q) dwt[q] += dwt[chunk * wsize + q];
      scalar_t* d = dw.data_ptr<scalar_t>();
      for (int64_t ci = 0; ci < g.cin; ++ci) {
        const int64_t gi = ci / g.cin_g, cl = ci % g.cin_g;
        for (int64_t k = 0; k < g.taps(); ++k)
          for (int64_t c = 0; c < g.cout_g; ++c)
            d[((gi * g.cout_g + c) * g.cin_g + cl) * g.taps() + k] = dwt[(ci * g.taps() + k) * g.cout_g + c];
      }
    }
    if (need_db) {
      scalar_t* d = db.data_ptr<scalar_t>();
      for (int64_t co = 0; co < g.cout; ++co) {
        scalar_t s = 0;
        for (int64_t chunk = 0; chunk < chunks; ++chunk) s += dbp[chunk * g.cout + co];
        d[co] = s;
      }
    }
  });
  return {dx, dw, db, gc};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsegrad, CPU, m) {
  m.impl("spike_pack", &spike_pack_cpu);
  m.impl("spike_conv2d_forward", &spike_conv2d_forward_cpu);
  m.impl("conv_pool2d", &conv_pool2d_cpu);
  m.impl("conv_unpool2d", &conv_unpool2d_cpu);
  m.impl("spike_conv2d_backward", &spike_conv2d_backward_cpu);
}

}  // namespace cpu
}  // namespace sparsegrad
