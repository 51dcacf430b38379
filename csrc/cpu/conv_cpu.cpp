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

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__GNUC__)
#define SG_CONV_UNROLL _Pragma("GCC unroll 16")
#else
#define SG_CONV_UNROLL
#endif

namespace sparsegrad {
namespace cpu {
namespace {

enum PoolKind { kPoolNone = 0, kPoolMax = 1, kPoolAvg = 2 };

int parse_pool(const std::string& pool) {
  if (pool == "none") return kPoolNone;
  if (pool == "max") return kPoolMax;
  if (pool == "avg") return kPoolAvg;
  TORCH_CHECK(false, "pool must be \"none\", \"max\" or \"avg\", got \"", pool, "\"");
}

struct ConvGeom {
  int64_t cin = 0, h = 0, w = 0, cout = 0, kh = 0, kw = 0;
  int64_t sh = 1, sw = 1, ph = 0, pw = 0, dh = 1, dw = 1, groups = 1;
  int64_t cin_g = 0, cout_g = 0, ho = 0, wo = 0;
  int pool = kPoolNone;
  int64_t pk = 1, hp = 0, wp = 0;
  int64_t in_size() const { return cin * h * w; }
  int64_t words() const { return (in_size() + 31) / 32; }
  int64_t taps() const { return kh * kw; }
};

ConvGeom make_geom(const at::Tensor& weight, at::IntArrayRef in_shape, at::IntArrayRef stride,
                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                   const std::string& pool, int64_t pool_k) {
  TORCH_CHECK(weight.dim() == 4, "weight must be [C_out, C_in/groups, KH, KW], got ",
              weight.sizes());
  TORCH_CHECK(in_shape.size() == 3, "in_shape must be [C_in, H, W], got ", in_shape);
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "stride, padding and dilation must have two entries each");
  ConvGeom g;
  g.cin = in_shape[0];
  g.h = in_shape[1];
  g.w = in_shape[2];
  g.cout = weight.size(0);
  g.kh = weight.size(2);
  g.kw = weight.size(3);
  g.sh = stride[0];
  g.sw = stride[1];
  g.ph = padding[0];
  g.pw = padding[1];
  g.dh = dilation[0];
  g.dw = dilation[1];
  g.groups = groups;
  TORCH_CHECK(g.sh >= 1 && g.sw >= 1, "stride must be >= 1, got ", stride);
  TORCH_CHECK(g.ph >= 0 && g.pw >= 0, "padding must be >= 0, got ", padding);
  TORCH_CHECK(g.dh >= 1 && g.dw >= 1, "dilation must be >= 1, got ", dilation);
  TORCH_CHECK(groups >= 1 && g.cin % groups == 0 && g.cout % groups == 0,
              "groups must divide C_in (", g.cin, ") and C_out (", g.cout, "), got ", groups);
  g.cin_g = g.cin / groups;
  g.cout_g = g.cout / groups;
  TORCH_CHECK(weight.size(1) == g.cin_g, "weight.shape[1] must be C_in/groups = ", g.cin_g,
              ", got ", weight.size(1));
  g.ho = (g.h + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.wo = (g.w + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  TORCH_CHECK(g.ho >= 1 && g.wo >= 1, "the convolution's output would be empty for input ",
              in_shape, " and kernel ", weight.sizes());
  g.pool = parse_pool(pool);
  g.pk = g.pool == kPoolNone ? 1 : pool_k;
  TORCH_CHECK(g.pk >= 1 && g.pk <= 16, "pool_k must be in [1, 16], got ", pool_k);
  g.hp = g.ho / g.pk;
  g.wp = g.wo / g.pk;
  TORCH_CHECK(g.hp >= 1 && g.wp >= 1, "pooling ", g.pk, "x", g.pk, " of a ", g.ho, "x", g.wo,
              " map would be empty");
  return g;
}

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

constexpr int64_t kLanes = 16;

template <typename scalar_t>
inline scalar_t lane_sum(const scalar_t* v) {
  scalar_t h[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) h[l] = v[l];
  for (int64_t n = kLanes / 2; n >= 1; n /= 2)
    for (int64_t l = 0; l < n; ++l) h[l] += h[l + n];
  return h[0];
}

// Calls f(k, p) for every tap k = ky*kw + kx of input position (iy, ix) that lands on an output
// position p = oy*wo + ox (no division when the stride is 1, the common case).
template <typename F>
inline void for_each_tap(const ConvGeom& g, int64_t iy, int64_t ix, F&& f) {
  for (int64_t ky = 0; ky < g.kh; ++ky) {
    int64_t oy = iy + g.ph - ky * g.dh;
    if (oy < 0) break;  // oy only decreases with ky
    if (g.sh != 1) {
      if (oy % g.sh) continue;
      oy /= g.sh;
    }
    if (oy >= g.ho) continue;
    for (int64_t kx = 0; kx < g.kw; ++kx) {
      int64_t ox = ix + g.pw - kx * g.dw;
      if (ox < 0) break;
      if (g.sw != 1) {
        if (ox % g.sw) continue;
        ox /= g.sw;
      }
      if (ox >= g.wo) continue;
      f(ky * g.kw + kx, oy * g.wo + ox);
    }
  }
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

// Calls f(j) for every set bit j of a sample's bit row, ascending.
template <typename F>
inline void for_each_event(const int32_t* bits, int64_t words, F&& f) {
  for (int64_t wd = 0; wd < words; ++wd) {
    uint32_t word = static_cast<uint32_t>(bits[wd]);
    while (word) {
      f(wd * 32 + __builtin_ctz(word));
      word &= word - 1;
    }
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
  for (int64_t py = 0; py < g.hp; ++py)
    for (int64_t px = 0; px < g.wp; ++px) {
      const int64_t o = py * g.wp + px;
      if (g.pool == kPoolNone) {
        const scalar_t* __restrict__ row = buf + (py * g.wo + px) * cout;
        for (int64_t co = 0; co < cout; ++co) out[co * plane + o] = row[co] + (bias ? bias[co] : 0);
        continue;
      }
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
              const bool take = v > best[co] || v != v;
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
      for (int64_t ky = 0; ky < g.kh; ++ky) {
        const int64_t iy = oy * g.sh - g.ph + ky * g.dh;
        if (iy < 0 || iy >= g.h) continue;
        for (int64_t kx = 0; kx < g.kw; ++kx) {
          const int64_t ix = ox * g.sw - g.pw + kx * g.dw;
          if (ix < 0 || ix >= g.w) continue;
          uint64_t m = mask[iy * g.w + ix];
          const scalar_t* wk = wt + (ky * g.kw + kx) * g.cout;
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
        }
      }
      scalar_t* dst = buf + (oy * g.wo + ox) * g.cout;
      for (int v = 0; v < NV; ++v) __builtin_memcpy(dst + v * L, &acc[v], sizeof(vec_t));
    }
}

template <typename scalar_t>
using GatherFn = void (*)(const ConvGeom&, const uint64_t*, const scalar_t*, scalar_t*);

template <typename scalar_t>
GatherFn<scalar_t> pick_gather(const ConvGeom& g) {
  constexpr int64_t L = 64 / sizeof(scalar_t);
  if (g.groups != 1 || g.cin > 64 || g.cout % L) return nullptr;
  switch (g.cout / L) {
    case 1: return &gather_sample<scalar_t, 1>;
    case 2: return &gather_sample<scalar_t, 2>;
    case 3: return &gather_sample<scalar_t, 3>;
    case 4: return &gather_sample<scalar_t, 4>;
    case 6: return &gather_sample<scalar_t, 6>;
    case 8: return &gather_sample<scalar_t, 8>;
    default: return nullptr;
  }
}

// Whether a sample's events make the gather form cheaper than the scatter form. Gather visits
// every output position's taps and walks the mask of channels that spiked under each (a load
// and a mostly mispredicted branch when masks hold 0-2 channels), then adds the rows into
// registers; scatter adds each event's rows into the buffer. Measured (1 thread) on the DVS
// net's layers at 0.1, 1.4 and 4.1 events per input position and the tutorial CSNN's conv2 at
// 0.76: gather was faster only at 4.1 (3.4 vs 4.4 ms), scatter 1.6-2.3x faster at the others.
inline bool dense_enough_to_gather(const int32_t* bits, int64_t words, int64_t in_positions) {
  int64_t nnz = 0;
  for (int64_t wd = 0; wd < words; ++wd) nnz += __builtin_popcount(static_cast<uint32_t>(bits[wd]));
  return nnz >= 2 * in_positions;
}

// x [N, M] (any float) -> bits [N, ceil(M/32)] int32 (bit j%32 of word j/32 = x[n, j] != 0),
// info int64 [2] = (nonzeros, entries that are neither 0 nor 1).
std::tuple<at::Tensor, at::Tensor> spike_pack_cpu(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.dim() == 2, "x must be [N, M], got ", x_in.sizes());
  TORCH_CHECK(at::isFloatingType(x_in.scalar_type()), "x must be a float tensor, got ",
              x_in.scalar_type());
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
          const int64_t j0 = wd * 32, j1 = std::min(m, j0 + 32);
          uint32_t word = 0;
          for (int64_t j = j0; j < j1; ++j) {
            const float v = static_cast<float>(row[j]);
            word |= static_cast<uint32_t>(v != 0.f) << (j - j0);
            bad += (v != 0.f) & (v != 1.f);
          }
          cnt += __builtin_popcount(word);
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
    at::IntArrayRef dilation, int64_t groups, const std::string& pool, int64_t pool_k) {
  TORCH_CHECK(weight_in.scalar_type() == at::kFloat || weight_in.scalar_type() == at::kDouble,
              "weight must be float32 or float64, got ", weight_in.scalar_type());
  const ConvGeom g = make_geom(weight_in, in_shape, stride, padding, dilation, groups, pool, pool_k);
  TORCH_CHECK(bits_in.dim() == 2 && bits_in.scalar_type() == at::kInt && bits_in.size(1) == g.words(),
              "bits must be int32 [N, ", g.words(), "] (spike_pack of [N, C_in*H*W]), got ",
              bits_in.scalar_type(), " ", bits_in.sizes());
  const at::Tensor bits = bits_in.contiguous(), weight = weight_in.contiguous();
  at::Tensor bias;
  if (bias_in.has_value()) {
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == g.cout &&
                    bias_in->scalar_type() == weight.scalar_type(),
                "bias must be [C_out] of the weight's dtype");
    bias = bias_in->contiguous();
  }
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
    const GatherFn<scalar_t> gather = pick_gather<scalar_t>(g);
    at::parallel_for(0, n, 1, [&](int64_t n0, int64_t n1) {
      std::vector<scalar_t> buf(static_cast<size_t>(g.ho * g.wo * g.cout));
      std::vector<scalar_t> best(static_cast<size_t>(g.cout));
      std::vector<uint8_t> arg(static_cast<size_t>(g.cout));
      std::vector<uint64_t> mask(static_cast<size_t>(gather ? g.h * g.w : 0));
      for (int64_t s = n0; s < n1; ++s) {
        scalar_t* __restrict__ b = buf.data();
        // The gather form visits every output position's taps; for a sample with few events
        // most masks it reads are empty or hold one channel, and adding each event's rows
        // (the scatter form) is cheaper.
        if (gather && dense_enough_to_gather(bp + s * g.words(), g.words(), g.h * g.w)) {
          std::fill(mask.begin(), mask.end(), uint64_t(0));
          for_each_event(bp + s * g.words(), g.words(), [&](int64_t j) {
            mask[j % (g.h * g.w)] |= uint64_t(1) << (j / (g.h * g.w));
          });
          gather(g, mask.data(), wt.data(), b);
          pool_from_cl(b, bias_p, g, op + s * plane, ip ? ip + s * plane : nullptr, best.data(),
                       arg.data());
          continue;
        }
        std::fill(buf.begin(), buf.end(), scalar_t(0));
        for_each_event(bp + s * g.words(), g.words(), [&](int64_t j) {
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

// 2x2 max pooling of two input rows, 16 outputs at a time (float, AVX-512): the same first-
// maximum rule as the scalar loop (a NaN first entry wins; else the first NaN or the first
// strict maximum). Returns the number of outputs done.
template <typename scalar_t>
inline int64_t max_pool2x2_row(const scalar_t*, const scalar_t*, int64_t, scalar_t*, uint8_t*) {
  return 0;  // double: the scalar loop
}

inline int64_t max_pool2x2_row(const float* r0, const float* r1, int64_t wp, float* o, uint8_t* oi) {
  int64_t px = 0;
#if defined(__AVX512F__)
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  for (; px + 16 <= wp; px += 16) {
    const __m512 a0 = _mm512_loadu_ps(r0 + 2 * px), a1 = _mm512_loadu_ps(r0 + 2 * px + 16);
    const __m512 b0 = _mm512_loadu_ps(r1 + 2 * px), b1 = _mm512_loadu_ps(r1 + 2 * px + 16);
    const __m512 v[4] = {_mm512_permutex2var_ps(a0, even, a1), _mm512_permutex2var_ps(a0, odd, a1),
                         _mm512_permutex2var_ps(b0, even, b1), _mm512_permutex2var_ps(b0, odd, b1)};
    const __mmask16 first_nan = _mm512_cmp_ps_mask(v[0], v[0], _CMP_UNORD_Q);
    __m512 best = v[0];
    __m512i arg = _mm512_setzero_si512();
    for (int k = 1; k < 4; ++k) {
      const __mmask16 take = static_cast<__mmask16>(
          (_mm512_cmp_ps_mask(v[k], best, _CMP_GT_OQ) | _mm512_cmp_ps_mask(v[k], v[k], _CMP_UNORD_Q)) &
          ~first_nan);
      best = _mm512_mask_mov_ps(best, take, v[k]);
      arg = _mm512_mask_mov_epi32(arg, take, _mm512_set1_epi32(k));
    }
    _mm512_storeu_ps(o + px, best);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(oi + px), _mm512_cvtepi32_epi8(arg));
  }
#endif
  return px;
}

// Pooling of a dense conv output y [N, C, Ho, Wo] (the dense route): out [N, C, Ho/k, Wo/k] and
// max pooling's uint8 winner offsets.
std::tuple<at::Tensor, at::Tensor> conv_pool2d_cpu(const at::Tensor& y_in, const std::string& pool,
                                                   int64_t pool_k) {
  TORCH_CHECK(y_in.dim() == 4, "y must be [N, C, H, W], got ", y_in.sizes());
  TORCH_CHECK(y_in.scalar_type() == at::kFloat || y_in.scalar_type() == at::kDouble,
              "y must be float32 or float64, got ", y_in.scalar_type());
  const int kind = parse_pool(pool);
  TORCH_CHECK(kind != kPoolNone, "conv_pool2d needs pool \"max\" or \"avg\"");
  TORCH_CHECK(pool_k >= 1 && pool_k <= 16, "pool_k must be in [1, 16], got ", pool_k);
  const at::Tensor y = y_in.contiguous();
  const int64_t n = y.size(0), c = y.size(1), ho = y.size(2), wo = y.size(3);
  const int64_t hp = ho / pool_k, wp = wo / pool_k;
  TORCH_CHECK(hp >= 1 && wp >= 1, "pooling ", pool_k, "x", pool_k, " of a ", ho, "x", wo,
              " map would be empty");
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
          // The common 2x2 case with the window unrolled (same first-maximum rule).
          for (int64_t py = 0; py < hp; ++py) {
            const scalar_t* r0 = src + 2 * py * wo;
            const scalar_t* r1 = r0 + wo;
            scalar_t* o = op + (q * hp + py) * wp;
            uint8_t* oi = ip + (q * hp + py) * wp;
            int64_t px = 0;
            px = max_pool2x2_row(r0, r1, wp, o, oi);  // float: 16 at a time
            for (; px < wp; ++px) {
              const scalar_t v[4] = {r0[2 * px], r0[2 * px + 1], r1[2 * px], r1[2 * px + 1]};
              scalar_t best = v[0];
              uint8_t arg = 0;
              if (std::isnan(best)) {
                o[px] = best, oi[px] = 0;
                continue;
              }
              for (uint8_t k = 1; k < 4; ++k)
                if (v[k] > best || std::isnan(v[k])) best = v[k], arg = k;
              o[px] = best;
              oi[px] = arg;
            }
          }
          continue;
        }
        for (int64_t py = 0; py < hp; ++py)
          for (int64_t px = 0; px < wp; ++px) {
            const int64_t o = (q * hp + py) * wp + px;
            if (kind == kPoolMax) {
              scalar_t best = -std::numeric_limits<scalar_t>::infinity();
              int64_t arg = 0;
              for (int64_t a = 0; a < pool_k; ++a)
                for (int64_t b = 0; b < pool_k; ++b) {
                  const scalar_t v = src[(py * pool_k + a) * wo + px * pool_k + b];
                  if (v > best || std::isnan(v)) {
                    best = v;
                    arg = a * pool_k + b;
                  }
                }
              op[o] = best;
              ip[o] = static_cast<uint8_t>(arg);
            } else {
              scalar_t s = 0;
              for (int64_t a = 0; a < pool_k; ++a)
                for (int64_t b = 0; b < pool_k; ++b) s += src[(py * pool_k + a) * wo + px * pool_k + b];
              op[o] = s / static_cast<scalar_t>(pool_k * pool_k);
            }
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
                             const std::string& pool, int64_t pool_k, int64_t h, int64_t w) {
  const int kind = parse_pool(pool);
  TORCH_CHECK(kind != kPoolNone, "conv_unpool2d needs pool \"max\" or \"avg\"");
  TORCH_CHECK(pool_k >= 1 && pool_k <= 16, "pool_k must be in [1, 16], got ", pool_k);
  TORCH_CHECK(grad_in.dim() == 4 && (grad_in.scalar_type() == at::kFloat ||
                                     grad_in.scalar_type() == at::kDouble),
              "grad must be a float32 / float64 [N, C, Hp, Wp] tensor, got ", grad_in.sizes());
  const at::Tensor grad = grad_in.contiguous();
  const int64_t n = grad.size(0), c = grad.size(1), hp = grad.size(2), wp = grad.size(3);
  TORCH_CHECK(h / pool_k == hp && w / pool_k == wp, "grad's map ", hp, "x", wp,
              " is not the ", pool_k, "x", pool_k, " pooling of ", h, "x", w);
  at::Tensor idx;
  if (kind == kPoolMax) {
    TORCH_CHECK(pool_idx_in.scalar_type() == at::kByte && pool_idx_in.sizes() == grad.sizes(),
                "pool_idx must be uint8 of grad's shape ", grad.sizes());
    idx = pool_idx_in.contiguous();
    TORCH_CHECK(idx.numel() == 0 || idx.max().item<int64_t>() < pool_k * pool_k,
                "pool_idx entries must lie in [0, pool_k**2 = ", pool_k * pool_k, ")");
  }
  at::Tensor out = at::empty({n, c, h, w}, grad.options());
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "conv_unpool2d", [&] {
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const uint8_t* ip = kind == kPoolMax ? idx.data_ptr<uint8_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t inv = scalar_t(1) / static_cast<scalar_t>(pool_k * pool_k);
    at::parallel_for(0, n * c, 16, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        scalar_t* dst = op + q * h * w;
        std::fill(dst, dst + h * w, scalar_t(0));
        const scalar_t* src = gp + q * hp * wp;
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
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> spike_conv2d_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& pool_idx_in, const c10::optional<at::Tensor>& bits_opt,
    const at::Tensor& weight_in, at::IntArrayRef in_shape, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, const std::string& pool,
    int64_t pool_k, const c10::optional<at::Tensor>& prev_cnt_opt,
    const c10::optional<at::Tensor>& prev_idx_opt, int64_t num_steps, bool need_dx, bool need_dw,
    bool need_db, bool need_grad_conv) {
  const ConvGeom g = make_geom(weight_in, in_shape, stride, padding, dilation, groups, pool, pool_k);
  const at::Tensor grad = grad_in.contiguous(), weight = weight_in.contiguous();
  TORCH_CHECK(grad.dim() == 4 && grad.size(1) == g.cout && grad.size(2) == g.hp && grad.size(3) == g.wp,
              "grad_out must be [N, ", g.cout, ", ", g.hp, ", ", g.wp, "], got ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == weight.scalar_type(), "grad_out must have the weight's dtype (",
              weight.scalar_type(), "), got ", grad.scalar_type());
  const int64_t n = grad.size(0);
  at::Tensor pool_idx;
  if (g.pool == kPoolMax) {
    TORCH_CHECK(pool_idx_in.scalar_type() == at::kByte && pool_idx_in.sizes() == grad.sizes(),
                "pool_idx must be uint8 of grad_out's shape ", grad.sizes());
    pool_idx = pool_idx_in.contiguous();
    TORCH_CHECK(pool_idx.numel() == 0 || pool_idx.max().item<int64_t>() < g.pk * g.pk,
                "pool_idx entries must lie in [0, pool_k**2 = ", g.pk * g.pk, ")");
  }
  at::Tensor bits;
  if (need_dw) {
    TORCH_CHECK(bits_opt.has_value(), "need_dw needs the input's bits");
    TORCH_CHECK(bits_opt->scalar_type() == at::kInt && bits_opt->dim() == 2 &&
                    bits_opt->size(0) == n && bits_opt->size(1) == g.words(),
                "bits must be int32 [", n, ", ", g.words(), "], got ", bits_opt->sizes());
    bits = bits_opt->contiguous();
  }
  at::Tensor prev_cnt, prev_idx;
  std::vector<int64_t> prev_off;
  int64_t batch = 0;
  if (need_dx) {
    TORCH_CHECK(prev_cnt_opt.has_value() && prev_idx_opt.has_value(),
                "need_dx needs the producer's active set (prev_cnt, prev_idx); without one, ask "
                "for grad_conv and take the dense dx");
    TORCH_CHECK(num_steps >= 1 && n % num_steps == 0, "num_steps must divide N = ", n, ", got ",
                num_steps);
    batch = n / num_steps;
    prev_cnt = prev_cnt_opt->to(at::kInt).contiguous();
    prev_idx = prev_idx_opt->to(at::kInt).contiguous();
    TORCH_CHECK(prev_cnt.dim() == 1 && prev_cnt.size(0) == n, "prev_cnt must be [B*T] = [", n,
                "], got ", prev_cnt.sizes());
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
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(8, n));
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
    const bool direct = g.pool == kPoolNone && !dxp && !gcp;
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      std::vector<scalar_t> buf(static_cast<size_t>(direct ? 0 : npos * g.cout));
      for (int64_t chunk = c0; chunk < c1; ++chunk) {
        scalar_t* __restrict__ dwc = need_dw ? dwt.data() + chunk * wsize : nullptr;
        scalar_t* dbc = need_db ? dbp.data() + chunk * g.cout : nullptr;
        const int64_t s0 = chunk * n / chunks, s1 = (chunk + 1) * n / chunks;
        for (int64_t s = s0; s < s1; ++s) {
          if (direct) {
            // No pooling and neither dx nor grad_conv: dW and db read the NCHW gradient itself
            // (the same sums in the same order as from the channels-last buffer below).
            const scalar_t* gs = gp + s * plane;
            if (dbc)
              for (int64_t p = 0; p < npos; ++p)
                for (int64_t co = 0; co < g.cout; ++co) {
                  const scalar_t v = gs[co * npos + p];
                  dbc[co] += v == scalar_t(0) ? scalar_t(0) : v;  // buf's +0 for a -0
                }
            if (dwc)
              for_each_event(bp + s * g.words(), g.words(), [&](int64_t j) {
                const int64_t ci = j / (g.h * g.w), rem = j % (g.h * g.w);
                const scalar_t* gc0 = gs + (ci / g.cin_g) * g.cout_g * npos;
                scalar_t* drow = dwc + ci * g.taps() * g.cout_g;
                for_each_tap(g, rem / g.w, rem % g.w, [&](int64_t k, int64_t p) {
                  scalar_t* __restrict__ d = drow + k * g.cout_g;
                  for (int64_t c = 0; c < g.cout_g; ++c) d[c] += gc0[c * npos + p];
                });
              });
            continue;
          }
          // Unpool the sample's gradient into buf[p][co].
          scalar_t* __restrict__ b = buf.data();
          const scalar_t* __restrict__ gs = gp + s * plane;
          bool any = false;
          if (g.pool == kPoolNone) {
            // A transposition (every entry written; zeros, -0 too, as +0 like the fill below).
            const int64_t cout = g.cout;
            scalar_t nz = 0;
            for (int64_t p = 0; p < npos; ++p)
              for (int64_t co = 0; co < cout; ++co) {
                const scalar_t v = gs[co * npos + p];
                const scalar_t w = v == scalar_t(0) ? scalar_t(0) : v;
                b[p * cout + co] = w;
                nz = w != scalar_t(0) ? scalar_t(1) : nz;
              }
            any = nz != scalar_t(0);
          } else {
            std::fill(buf.begin(), buf.end(), scalar_t(0));
            for (int64_t co = 0; co < g.cout; ++co)
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
            for_each_event(bp + s * g.words(), g.words(), [&](int64_t j) {
              const int64_t ci = j / (g.h * g.w), rem = j % (g.h * g.w);
              const int64_t c0 = (ci / g.cin_g) * g.cout_g;
              scalar_t* drow = dwc + ci * g.taps() * g.cout_g;
              for_each_tap(g, rem / g.w, rem % g.w, [&](int64_t k, int64_t p) {
                add_row(g.cout_g, drow + k * g.cout_g, b + p * g.cout + c0);
              });
            });
          }
          if (dxp) {
            // Sample s = t*B + b of the folded batch is row b*T + t of the producer's CSR.
            const int64_t row = (s % batch) * num_steps + s / batch;
            scalar_t* dxs = dxp + s * g.in_size();
            for (int64_t e = prev_off[row]; e < prev_off[row + 1]; ++e) {
              const int64_t j = pix[e];
              const int64_t ci = j / (g.h * g.w), rem = j % (g.h * g.w);
              const int64_t c0 = (ci / g.cin_g) * g.cout_g;
              const scalar_t* wrow = wt.data() + ci * g.taps() * g.cout_g;
              // Lane l sums the channels c with c % kLanes == l over all taps, then the lanes
              // are added in a fixed tree: vectorises without reassociating, same bits anywhere.
              scalar_t acc[kLanes] = {};
              scalar_t tail = 0;
              const int64_t full = g.cout_g - g.cout_g % kLanes;
              for_each_tap(g, rem / g.w, rem % g.w, [&](int64_t k, int64_t p) {
                const scalar_t* __restrict__ wv = wrow + k * g.cout_g;
                const scalar_t* __restrict__ gv = b + p * g.cout + c0;
                for (int64_t c = 0; c < full; c += kLanes)
                  for (int64_t l = 0; l < kLanes; ++l) acc[l] += wv[c + l] * gv[c + l];
                for (int64_t c = full; c < g.cout_g; ++c) tail += wv[c] * gv[c];
              });
              dxs[j] = lane_sum(acc) + tail;
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
