// Host side of the convolution ops on CUDA (spike_pack, spike_conv2d_forward, conv_pool2d,
// conv_unpool2d, spike_conv2d_backward): checks (conv_geom.h, shared with the CPU kernels),
// buffers and launches (kernels: conv.cuh), written once as templates over a Launcher (host_ops.h)
// for the GPU (sparsegrad_cuda.cu) and the host emulation (csrc/emul/emul_ops.cpp).
//
// No host synchronisation: spike_pack leaves its counts on the device (the Python layer reads
// them to choose the route), and the contents that only the data can show (max pooling's winner
// offsets, the producer's CSR) are checked through the error flag (NaN gradients on the GPU, an
// error in the emulation; csr.cuh).
//
// The backward keeps the unpooled gradient channels-last [N, Ho, Wo, C_out] (a temporary of the
// conv output's size, as the CPU's per-sample buffer) and the weight transposed to
// [C_in][KH*KW][C_out/groups], the layouts of the CPU kernel, so that dx_dot reads both the same way.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/Optional.h>

#include <tuple>

#include "conv_geom.h"
#include "cuda/conv.cuh"
#include "cuda/host_ops.h"  // prepare_csr, finish_with_flag

namespace sparsegrad {
namespace cuda {
namespace host {

using ConvPair = std::tuple<at::Tensor, at::Tensor>;
using ConvGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

namespace conv_detail {

inline const char* const* flag_names() {
  static const char* const names[3] = {"", "", "prev_cnt / prev_idx"};
  return names;
}

// The unpooled gradient of conv_unpool_kernel.
template <class L, typename scalar_t>
void unpool(const at::Tensor& grad, const at::Tensor& pool_idx, int kind, int64_t pk, int64_t c,
            int64_t h, int64_t w, bool drop_zero, bool channels_last, const at::Tensor& out,
            const at::Tensor& flag) {
  UnpoolArgs<scalar_t> a;
  a.grad = grad.data_ptr<scalar_t>();
  a.pool_idx = kind == conv::kPoolMax ? pool_idx.data_ptr<uint8_t>() : nullptr;
  a.n = grad.size(0);
  a.c = c;
  a.hp = grad.size(2);
  a.wp = grad.size(3);
  a.h = h;
  a.w = w;
  a.pk = kind == conv::kPoolNone ? 1 : pk;
  a.kind = kind;
  a.drop_zero = drop_zero;
  a.channels_last = channels_last;
  a.out = out.data_ptr<scalar_t>();
  a.flag = flag.data_ptr<int32_t>();
  L::launch(out.numel(), &conv_unpool_kernel<scalar_t>, a);
}

}  // namespace conv_detail

template <class L>
ConvPair spike_pack(const at::Tensor& x_in) {
  conv::check_pack_input(x_in);
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.size(0), m = x.size(1), words = (m + 31) / 32;
  at::Tensor bits = at::empty({n, words}, x.options().dtype(at::kInt));
  at::Tensor info = at::zeros({2}, x.options().dtype(at::kLong));
  if (n * words == 0) return {bits, info};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spike_pack_cuda", [&] {
    L::launch_in(L::warp_shape(n * words), &spike_pack_kernel<scalar_t>, x.data_ptr<scalar_t>(), n, m,
                 words, bits.data_ptr<int32_t>(), info.data_ptr<int64_t>());
  });
  return {bits, info};
}

template <class L>
ConvPair spike_conv2d_forward(const at::Tensor& bits_in, const at::Tensor& weight_in,
                              const c10::optional<at::Tensor>& bias_in, at::IntArrayRef in_shape,
                              at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation, int64_t groups, c10::string_view pool,
                              int64_t pool_k) {
  const conv::ConvGeom g = conv::make_geom(weight_in, in_shape, stride, padding, dilation, groups,
                                           pool, pool_k);
  conv::check_bits(bits_in, g, -1, weight_in);
  conv::check_bias(bias_in, g, weight_in);
  const at::Tensor bits = bits_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const int64_t n = bits.size(0);
  const auto byte_opts = weight.options().dtype(at::kByte);
  at::Tensor out = at::empty({n, g.cout, g.hp, g.wp}, weight.options());
  at::Tensor idx = g.pool == conv::kPoolMax ? at::empty({n, g.cout, g.hp, g.wp}, byte_opts)
                                            : at::empty({0}, byte_opts);
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "spike_conv2d_forward_cuda", [&] {
    ConvForwardArgs<scalar_t> a;
    a.bits = bits.data_ptr<int32_t>();
    a.weight = weight.data_ptr<scalar_t>();
    a.bias = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    a.out = out.data_ptr<scalar_t>();
    a.pool_idx = g.pool == conv::kPoolMax ? idx.data_ptr<uint8_t>() : nullptr;
    a.g = g;
    a.n = n;
    a.taps_major = conv::forward_taps_major(g.groups, g.cin, g.cout, sizeof(scalar_t));
    L::launch(out.numel(), &spike_conv2d_forward_kernel<scalar_t>, a);
  });
  return {out, idx};
}

template <class L>
ConvPair conv_pool2d(const at::Tensor& y_in, c10::string_view pool, int64_t pool_k) {
  const int kind = conv::check_pool_input(y_in, pool, pool_k, "conv_pool2d");
  const at::Tensor y = y_in.contiguous();
  const int64_t n = y.size(0), c = y.size(1), ho = y.size(2), wo = y.size(3);
  const auto byte_opts = y.options().dtype(at::kByte);
  at::Tensor out = at::empty({n, c, ho / pool_k, wo / pool_k}, y.options());
  at::Tensor idx = kind == conv::kPoolMax ? at::empty(out.sizes(), byte_opts) : at::empty({0}, byte_opts);
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "conv_pool2d_cuda", [&] {
    L::launch(out.numel(), &conv_pool2d_kernel<scalar_t>, y.data_ptr<scalar_t>(), n * c, ho, wo, pool_k,
              kind, out.data_ptr<scalar_t>(),
              kind == conv::kPoolMax ? idx.data_ptr<uint8_t>() : static_cast<uint8_t*>(nullptr));
  });
  return {out, idx};
}

template <class L>
at::Tensor conv_unpool2d(const at::Tensor& grad_in, const at::Tensor& pool_idx_in, c10::string_view pool,
                         int64_t pool_k, int64_t h, int64_t w) {
  const int kind = conv::check_unpool_args(grad_in, pool_idx_in, pool, pool_k, h, w);
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor idx = kind == conv::kPoolMax ? pool_idx_in.contiguous() : at::Tensor();
  at::Tensor out = at::empty({grad.size(0), grad.size(1), h, w}, grad.options());
  const at::Tensor flag = at::zeros({1}, grad.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "conv_unpool2d_cuda", [&] {
    conv_detail::unpool<L, scalar_t>(grad, idx, kind, pool_k, grad.size(1), h, w, false, false, out, flag);
    finish_with_flag<L, scalar_t>(flag, {out}, "conv_unpool2d", conv_detail::flag_names());
  });
  return out;
}

// 1. the unpooled gradient, channels-last (and NCHW when grad_conv is asked for);
// 2. which samples have any gradient (ATen: no synchronisation);
// 3. db and dW per fixed chunk of samples, the chunks added in order;
// 4. dx at the producer's active set.
template <class L>
ConvGrads spike_conv2d_backward(const at::Tensor& grad_in, const at::Tensor& pool_idx_in,
                                const c10::optional<at::Tensor>& bits_opt, const at::Tensor& weight_in,
                                at::IntArrayRef in_shape, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                c10::string_view pool, int64_t pool_k,
                                const c10::optional<at::Tensor>& prev_cnt_opt,
                                const c10::optional<at::Tensor>& prev_idx_opt, int64_t num_steps,
                                bool need_dx, bool need_dw, bool need_db, bool need_grad_conv) {
  const conv::ConvGeom g = conv::make_geom(weight_in, in_shape, stride, padding, dilation, groups,
                                           pool, pool_k);
  conv::check_backward_args(grad_in, pool_idx_in, bits_opt, weight_in, g, need_dw);
  const at::Tensor grad = grad_in.contiguous(), weight = weight_in.contiguous();
  const int64_t n = grad.size(0);
  const at::Tensor idx = g.pool == conv::kPoolMax ? pool_idx_in.contiguous() : at::Tensor();
  const at::Tensor bits = need_dw ? bits_opt->contiguous() : at::Tensor();
  const int64_t batch =
      need_dx ? conv::check_producer_set(prev_cnt_opt, prev_idx_opt, n, num_steps, weight) : 0;
  const auto opts = weight.options();
  const at::Tensor flag = at::zeros({1}, opts.dtype(at::kInt));
  DeviceCsr prev;
  if (need_dx)
    prev = prepare_csr<L>(prev_cnt_opt->to(at::kInt).contiguous(), prev_idx_opt->to(at::kInt), n,
                          g.in_size(), flag, 2, "spike_conv2d_backward", "prev_cnt");
  at::Tensor dx = need_dx ? at::zeros({n, g.cin, g.h, g.w}, opts) : at::empty({0}, opts);
  at::Tensor gc = need_grad_conv ? at::empty({n, g.cout, g.ho, g.wo}, opts) : at::empty({0}, opts);
  at::Tensor dw = at::empty({0}, opts), db = need_db ? at::empty({g.cout}, opts) : at::empty({0}, opts);
  const int64_t chunks = conv::grad_chunks(n);
  const int64_t wsize = g.cin * g.taps() * g.cout_g;
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "spike_conv2d_backward_cuda", [&] {
    if (need_grad_conv)
      conv_detail::unpool<L, scalar_t>(grad, idx, g.pool, g.pk, g.cout, g.ho, g.wo, true, false, gc, flag);
    if (need_dx || need_dw || need_db) {
      const at::Tensor gcl = at::empty({n, g.ho, g.wo, g.cout}, opts);
      conv_detail::unpool<L, scalar_t>(grad, idx, g.pool, g.pk, g.cout, g.ho, g.wo, true, true, gcl, flag);
      const at::Tensor any = grad.reshape({n, g.cout * g.hp * g.wp}).ne(0).any(1);
      const bool* anyp = any.data_ptr<bool>();
      if (need_db) {
        const at::Tensor part = at::empty({chunks, g.cout}, opts);
        L::launch(chunks * g.cout, &conv_db_partial_kernel<scalar_t>, gcl.data_ptr<scalar_t>(), anyp, n,
                  g.npos(), g.cout, chunks, part.data_ptr<scalar_t>());
        L::launch(g.cout, &chunk_sum_kernel<scalar_t>, part.data_ptr<scalar_t>(), chunks, g.cout, true,
                  db.data_ptr<scalar_t>());
      }
      if (need_dw) {
        const at::Tensor part = at::empty({chunks, wsize}, opts);
        const at::Tensor dwt = at::empty({g.cin, g.taps(), g.cout_g}, opts);
        L::launch(chunks * wsize, &conv_dw_partial_kernel<scalar_t>, bits.data_ptr<int32_t>(),
                  gcl.data_ptr<scalar_t>(), anyp, g, n, chunks, part.data_ptr<scalar_t>());
        L::launch(wsize, &chunk_sum_kernel<scalar_t>, part.data_ptr<scalar_t>(), chunks, wsize, false,
                  dwt.data_ptr<scalar_t>());
        // [groups][C_in/groups][taps][C_out/groups] -> [C_out][C_in/groups][KH][KW]
        dw = dwt.view({g.groups, g.cin_g, g.taps(), g.cout_g}).permute({0, 3, 1, 2}).reshape(weight.sizes())
                 .contiguous();
      }
      if (need_dx && prev.n > 0) {
        // [C_out][C_in/groups][taps] -> [groups][C_in/groups][taps][C_out/groups] = [C_in][taps][C_out/groups]
        const at::Tensor wt =
            weight.view({g.groups, g.cout_g, g.cin_g, g.taps()}).permute({0, 2, 3, 1}).contiguous();
        L::launch(prev.n, &conv_dx_kernel<scalar_t>, prev.idx.data_ptr<int32_t>(),
                  prev.row.data_ptr<int64_t>(), prev.n, wt.data_ptr<scalar_t>(),
                  gcl.data_ptr<scalar_t>(), anyp, g, batch, num_steps, dx.data_ptr<scalar_t>());
      }
    }
    finish_with_flag<L, scalar_t>(flag, {dx, dw, db, gc}, "spike_conv2d_backward", conv_detail::flag_names());
  });
  return {dx, dw, db, gc};
}

}  // namespace host
}  // namespace cuda
}  // namespace sparsegrad
