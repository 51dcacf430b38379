// Argument checks and geometry of the convolution ops, written once for the CPU kernels
// (csrc/cpu/conv_cpu.cpp) and the CUDA host code (csrc/cuda/conv_host.h). Contents that only the
// data can show (max pooling's winner offsets in range, the producer's CSR) are checked by each
// device its own way: on the host by the CPU, through an error flag on the GPU.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <string>

#include "conv_math.h"

namespace sparsegrad {
namespace conv {

inline int parse_pool(c10::string_view pool) {
  if (pool == "none") return kPoolNone;
  if (pool == "max") return kPoolMax;
  if (pool == "avg") return kPoolAvg;
  TORCH_CHECK(false, "pool must be \"none\", \"max\" or \"avg\", got \"", std::string(pool), "\"");
}

inline void check_pack_input(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2, "x must be [N, M], got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "x must be a float tensor, got ", x.scalar_type());
}

inline void check_pool_k(int64_t pool_k) {
  TORCH_CHECK(pool_k >= 1 && pool_k <= 16, "pool_k must be in [1, 16], got ", pool_k);
}

inline ConvGeom make_geom(const at::Tensor& weight, at::IntArrayRef in_shape, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                          c10::string_view pool, int64_t pool_k) {
  TORCH_CHECK(weight.dim() == 4, "weight must be [C_out, C_in/groups, KH, KW], got ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble,
              "weight must be float32 or float64, got ", weight.scalar_type());
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
  // event indices are int32 (bits, producer CSRs)
  TORCH_CHECK(g.in_size() < (int64_t(1) << 31), "in_shape ", in_shape,
              " has 2^31 or more entries per sample");
  g.ho = conv_out_size(g.h, g.ph, g.dh, g.kh, g.sh);
  g.wo = conv_out_size(g.w, g.pw, g.dw, g.kw, g.sw);
  TORCH_CHECK(g.ho >= 1 && g.wo >= 1, "the convolution's output would be empty for input ",
              in_shape, " and kernel ", weight.sizes());
  g.pool = parse_pool(pool);
  g.pk = g.pool == kPoolNone ? 1 : pool_k;
  check_pool_k(g.pk);
  g.hp = g.ho / g.pk;
  g.wp = g.wo / g.pk;
  TORCH_CHECK(g.hp >= 1 && g.wp >= 1, "pooling ", g.pk, "x", g.pk, " of a ", g.ho, "x", g.wo,
              " map would be empty");
  return g;
}

inline void check_bits(const at::Tensor& bits, const ConvGeom& g, int64_t n, const at::Tensor& ref) {
  TORCH_CHECK(bits.dim() == 2 && bits.scalar_type() == at::kInt && bits.size(1) == g.words() &&
                  (n < 0 || bits.size(0) == n),
              "bits must be int32 [", n < 0 ? std::string("N") : std::to_string(n), ", ", g.words(),
              "] (spike_pack of [N, C_in*H*W]), got ", bits.scalar_type(), " ", bits.sizes());
  TORCH_CHECK(bits.device() == ref.device(), "bits is on ", bits.device(), " but weight is on ",
              ref.device());
}

inline void check_bias(const c10::optional<at::Tensor>& bias, const ConvGeom& g,
                       const at::Tensor& weight) {
  if (!bias.has_value()) return;
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == g.cout &&
                  bias->scalar_type() == weight.scalar_type(),
              "bias must be [C_out] of the weight's dtype");
  TORCH_CHECK(bias->device() == weight.device(), "bias is on ", bias->device(),
              " but weight is on ", weight.device());
}

// y [N, C, H, W] float32 / float64, pool "max" / "avg": returns the pool kind.
inline int check_pool_input(const at::Tensor& y, c10::string_view pool, int64_t pool_k,
                            const char* op) {
  TORCH_CHECK(y.dim() == 4, "y must be [N, C, H, W], got ", y.sizes());
  TORCH_CHECK(y.scalar_type() == at::kFloat || y.scalar_type() == at::kDouble,
              "y must be float32 or float64, got ", y.scalar_type());
  const int kind = parse_pool(pool);
  TORCH_CHECK(kind != kPoolNone, op, " needs pool \"max\" or \"avg\"");
  check_pool_k(pool_k);
  TORCH_CHECK(y.size(2) / pool_k >= 1 && y.size(3) / pool_k >= 1, "pooling ", pool_k, "x", pool_k,
              " of a ", y.size(2), "x", y.size(3), " map would be empty");
  return kind;
}

// conv_unpool2d: grad [N, C, Hp, Wp] with Hp = h / pool_k, Wp = w / pool_k; returns the pool kind.
inline int check_unpool_args(const at::Tensor& grad, const at::Tensor& pool_idx, c10::string_view pool,
                             int64_t pool_k, int64_t h, int64_t w) {
  const int kind = parse_pool(pool);
  TORCH_CHECK(kind != kPoolNone, "conv_unpool2d needs pool \"max\" or \"avg\"");
  check_pool_k(pool_k);
  TORCH_CHECK(grad.dim() == 4 && (grad.scalar_type() == at::kFloat ||
                                  grad.scalar_type() == at::kDouble),
              "grad must be a float32 / float64 [N, C, Hp, Wp] tensor, got ", grad.sizes());
  TORCH_CHECK(h / pool_k == grad.size(2) && w / pool_k == grad.size(3), "grad's map ",
              grad.size(2), "x", grad.size(3), " is not the ", pool_k, "x", pool_k,
              " pooling of ", h, "x", w);
  if (kind == kPoolMax) {
    TORCH_CHECK(pool_idx.scalar_type() == at::kByte && pool_idx.sizes() == grad.sizes(),
                "pool_idx must be uint8 of grad's shape ", grad.sizes());
    TORCH_CHECK(pool_idx.device() == grad.device(), "pool_idx is on ", pool_idx.device(),
                " but grad is on ", grad.device());
  }
  return kind;
}

// spike_conv2d_backward's tensors other than the producer's CSR (checked per device).
inline void check_backward_args(const at::Tensor& grad, const at::Tensor& pool_idx,
                                const c10::optional<at::Tensor>& bits, const at::Tensor& weight,
                                const ConvGeom& g, bool need_dw) {
  TORCH_CHECK(grad.dim() == 4 && grad.size(1) == g.cout && grad.size(2) == g.hp && grad.size(3) == g.wp,
              "grad_out must be [N, ", g.cout, ", ", g.hp, ", ", g.wp, "], got ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == weight.scalar_type(), "grad_out must have the weight's dtype (",
              weight.scalar_type(), "), got ", grad.scalar_type());
  TORCH_CHECK(grad.device() == weight.device(), "grad_out is on ", grad.device(),
              " but weight is on ", weight.device());
  if (g.pool == kPoolMax) {
    TORCH_CHECK(pool_idx.scalar_type() == at::kByte && pool_idx.sizes() == grad.sizes(),
                "pool_idx must be uint8 of grad_out's shape ", grad.sizes());
    TORCH_CHECK(pool_idx.device() == grad.device(), "pool_idx is on ", pool_idx.device(),
                " but grad_out is on ", grad.device());
  }
  if (need_dw) {
    TORCH_CHECK(bits.has_value(), "need_dw needs the input's bits");
    check_bits(*bits, g, grad.size(0), weight);
  }
}

// The producer's CSR for dx: present, over N = num_steps * B rows.
inline int64_t check_producer_set(const c10::optional<at::Tensor>& prev_cnt,
                                  const c10::optional<at::Tensor>& prev_idx, int64_t n,
                                  int64_t num_steps, const at::Tensor& weight) {
  TORCH_CHECK(prev_cnt.has_value() && prev_idx.has_value(),
              "need_dx needs the producer's active set (prev_cnt, prev_idx); without one, ask "
              "for grad_conv and take the dense dx");
  TORCH_CHECK(num_steps >= 1 && n % num_steps == 0, "num_steps must divide N = ", n, ", got ",
              num_steps);
  TORCH_CHECK(prev_cnt->dim() == 1 && prev_cnt->size(0) == n, "prev_cnt must be [B*T] = [", n,
              "], got ", prev_cnt->sizes());
  TORCH_CHECK(prev_idx->dim() == 1, "prev_idx must be 1-D, got ", prev_idx->sizes());
  TORCH_CHECK(!at::isFloatingType(prev_cnt->scalar_type()) &&
                  !at::isFloatingType(prev_idx->scalar_type()),
              "prev_cnt and prev_idx must be integer tensors");
  TORCH_CHECK(prev_cnt->device() == weight.device() && prev_idx->device() == weight.device(),
              "prev_cnt and prev_idx must be on the weight's device (", weight.device(), ")");
  return n / num_steps;
}

}  // namespace conv
}  // namespace sparsegrad
