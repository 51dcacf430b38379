// CUDA kernels of every sparsegrad op: TORCH_LIBRARY_IMPL(sparsegrad, CUDA). The kernels live in
// csrc/cuda/*.cuh, the host sequence (buffers, launches, scans, GEMMs) in csrc/cuda/host_ops.h,
// both shared with the host emulation that runs them on the CPU in the tests. This file only adds
// what is GPU-specific: the device guard, the current stream and the launch check.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <vector>

#include "low_precision.h"

#include "cuda/conv_host.h"
#include "cuda/host_ops.h"
#include "cuda/neuron_host.h"
#include "cuda/recurrent_host.h"

namespace sparsegrad {
namespace cuda {
namespace {

// The backward routes forced instead of the cost model's choice (0: the model decides). Read once
// from SPARSEGRAD_CUDA_ROUTES ("dw=events,dx=dots", gpu_routes.h parse_forced_routes) at the first
// backward; torch.ops.sparsegrad_cuda.set_routes(dw, dx) changes them at run time (the route tests).
struct ForcedRoutes {
  std::atomic<int> dw{0}, dx{0};
};

ForcedRoutes& forced_routes() {
  static ForcedRoutes* instance = [] {
    auto* r = new ForcedRoutes;  // (never freed: used until exit)
    if (const char* spec = std::getenv("SPARSEGRAD_CUDA_ROUTES")) {
      int dw = 0, dx = 0;
      TORCH_CHECK(routes::parse_forced_routes(spec, &dw, &dx), "SPARSEGRAD_CUDA_ROUTES='", spec,
                  "': expected e.g. 'dw=events,dx=dots' (dw: auto, events, active, gemm; dx: auto, "
                  "dots, gemm)");
      r->dw = dw;
      r->dx = dx;
    }
    return r;
  }();
  return *instance;
}

void set_routes(int64_t dw_route, int64_t dx_route) {
  TORCH_CHECK(dw_route >= 0 && dw_route <= 3, "sparsegrad_cuda.set_routes: 'dw_route' must be 0..3 "
              "(auto, events, active, gemm), got ", dw_route);
  TORCH_CHECK(dx_route >= 0 && dx_route <= 2, "sparsegrad_cuda.set_routes: 'dx_route' must be 0..2 "
              "(auto, dots, gemm), got ", dx_route);
  forced_routes().dw = int(dw_route);
  forced_routes().dx = int(dx_route);
}

std::vector<int64_t> get_routes() { return {forced_routes().dw.load(), forced_routes().dx.load()}; }

struct CudaLauncher {
  static constexpr bool kHostReadsFlag = false;  // reading it would synchronise: NaN gradients instead
  static int forced_dw_route() { return forced_routes().dw; }  // 0: the cost model decides
  static int forced_dx_route() { return forced_routes().dx; }

  template <typename... KArgs, typename... Args>
  static void launch(int64_t n, void (*kernel)(KArgs...), Args... args) {
    if (n <= 0) return;  // a zero-block launch is an error
    const LaunchShape shape = launch_shape(n);
    kernel<<<dim3(unsigned(shape.blocks)), dim3(unsigned(shape.threads)), 0,
             at::cuda::getCurrentCUDAStream()>>>(static_cast<KArgs>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // Whole-warp geometries (kernel_common.cuh): 256 threads; the walks fewer at small B*N so that
  // they reach more of the SMs.
  static LaunchShape warp_shape(int64_t n) { return warp_launch_shape(n); }
  static LaunchShape walk_shape(int64_t n) {
    return walk_launch_shape(n, at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  }

  static int64_t resident_threads() {
    const cudaDeviceProp* p = at::cuda::getCurrentDeviceProperties();
    return int64_t(p->multiProcessorCount) * int64_t(p->maxThreadsPerMultiProcessor);
  }

  template <typename... KArgs, typename... Args>
  static void launch_in(LaunchShape shape, void (*kernel)(KArgs...), Args... args) {
    kernel<<<dim3(unsigned(shape.blocks)), dim3(unsigned(shape.threads)), 0,
             at::cuda::getCurrentCUDAStream()>>>(static_cast<KArgs>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

using L = CudaLauncher;

// Every op runs on the device of its first tensor argument, on that device's current stream.
void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  SG_CHECK(t.is_cuda(), op, name, "must be a CUDA tensor here (the other inputs are), got ", t.device());
}

host::ForwardOutputs lif_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                                      const c10::optional<at::Tensor>& bias,
                                      const c10::optional<at::Tensor>& v_init,
                                      const c10::optional<at::Tensor>& s_init,
                                      const c10::optional<at::Tensor>& x_act_cnt,
                                      const c10::optional<at::Tensor>& x_act_idx, double alpha,
                                      double threshold, double b_th, double slope, bool sparse,
                                      c10::string_view surrogate, c10::string_view reset) {
  check_cuda(x, "lif_forward", "x");
  const c10::cuda::CUDAGuard guard(x.device());
  return host::lif_forward<L>(x, weight, bias, v_init, s_init, x_act_cnt, x_act_idx, alpha,
                              threshold, b_th, slope, sparse, surrogate, reset);
}

host::LifGrads lif_backward_sparse_cuda(const at::Tensor& grad_spikes,
                                        const c10::optional<at::Tensor>& grad_v_final,
                                        const at::Tensor& weight, const at::Tensor& act_cnt,
                                        const at::Tensor& act_idx, const at::Tensor& act_sg,
                                        const at::Tensor& ev_cnt, const at::Tensor& ev_idx,
                                        const at::Tensor& ev_val,
                                        const c10::optional<at::Tensor>& prev_cnt,
                                        const c10::optional<at::Tensor>& prev_idx,
                                        const c10::optional<at::Tensor>& rst_bits, double alpha,
                                        bool need_dx, bool need_dw, bool need_db, bool need_dv,
                                        int64_t dw_route) {
  check_cuda(grad_spikes, "lif_backward_sparse", "grad_spikes");
  const c10::cuda::CUDAGuard guard(grad_spikes.device());
  return host::lif_backward_sparse<L>(grad_spikes, grad_v_final, weight, act_cnt, act_idx, act_sg,
                                      ev_cnt, ev_idx, ev_val, prev_cnt, prev_idx, rst_bits, alpha,
                                      need_dx, need_dw, need_db, need_dv, dw_route);
}

host::LifGrads lif_backward_dense_cuda(const at::Tensor& grad_spikes,
                                       const c10::optional<at::Tensor>& grad_v_final,
                                       const at::Tensor& x, const at::Tensor& weight,
                                       const at::Tensor& sg, const c10::optional<at::Tensor>& rst_bits,
                                       double alpha, bool need_dx, bool need_dw, bool need_db,
                                       bool need_dv) {
  check_cuda(grad_spikes, "lif_backward_dense", "grad_spikes");
  const c10::cuda::CUDAGuard guard(grad_spikes.device());
  return host::lif_backward_dense<L>(grad_spikes, grad_v_final, x, weight, sg, rst_bits, alpha,
                                     need_dx, need_dw, need_db, need_dv);
}

host::ReadoutForwardOutputs li_readout_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                    const c10::optional<at::Tensor>& bias,
                                                    const c10::optional<at::Tensor>& x_act_cnt,
                                                    const c10::optional<at::Tensor>& x_act_idx,
                                                    double alpha, c10::string_view reduce) {
  check_cuda(x, "li_readout_forward", "x");
  const c10::cuda::CUDAGuard guard(x.device());
  return host::li_readout_forward<L>(x, weight, bias, x_act_cnt, x_act_idx, alpha, reduce);
}

host::ReadoutGrads li_readout_backward_cuda(const at::Tensor& grad_out, const at::Tensor& argmax_t,
                                            const at::Tensor& weight, const at::Tensor& ev_cnt,
                                            const at::Tensor& ev_idx, const at::Tensor& ev_val,
                                            const c10::optional<at::Tensor>& prev_cnt,
                                            const c10::optional<at::Tensor>& prev_idx,
                                            int64_t num_steps, double alpha,
                                            c10::string_view reduce, bool need_dx, bool need_dw,
                                            bool need_db) {
  check_cuda(grad_out, "li_readout_backward", "grad_out");
  const c10::cuda::CUDAGuard guard(grad_out.device());
  return host::li_readout_backward<L>(grad_out, argmax_t, weight, ev_cnt, ev_idx, ev_val, prev_cnt,
                                      prev_idx, num_steps, alpha, reduce, need_dx, need_dw, need_db);
}

host::NeuronForwardOutputs lif_neuron_forward_cuda(
    const at::Tensor& current, const c10::optional<at::Tensor>& v_init,
    const c10::optional<at::Tensor>& s_init, double alpha, double threshold, double b_th,
    double slope, bool sparse, c10::string_view surrogate, c10::string_view reset, bool return_mem,
    c10::string_view dynamics, double tau, double v_reset, bool detach_reset) {
  check_cuda(current, "lif_neuron_forward", "current");
  const c10::cuda::CUDAGuard guard(current.device());
  return host::lif_neuron_forward<L>(current, v_init, s_init, alpha, threshold, b_th, slope, sparse,
                                     surrogate, reset, return_mem, dynamics, tau, v_reset,
                                     detach_reset);
}

host::ParamNeuronOutputs lif_neuron_param_forward_cuda(
    const at::Tensor& current, const c10::optional<at::Tensor>& v_init,
    const c10::optional<at::Tensor>& s_init, const c10::optional<at::Tensor>& syn_init,
    const at::Tensor& alpha, const at::Tensor& threshold,
    const c10::optional<at::Tensor>& alpha_syn, double b_th, double slope, bool sparse,
    c10::string_view surrogate, c10::string_view reset, bool return_mem, bool need_dalpha,
    bool need_dthreshold, bool need_dalpha_syn) {
  check_cuda(current, "lif_neuron_param_forward", "current");
  const c10::cuda::CUDAGuard guard(current.device());
  return host::lif_neuron_param_forward<L>(current, v_init, s_init, syn_init, alpha, threshold,
                                           alpha_syn, b_th, slope, sparse, surrogate, reset,
                                           return_mem, need_dalpha, need_dthreshold,
                                           need_dalpha_syn);
}

host::ParamNeuronGrads lif_neuron_param_backward_cuda(
    const at::Tensor& grad_spikes, const c10::optional<at::Tensor>& grad_v_final,
    const c10::optional<at::Tensor>& grad_syn_final, const c10::optional<at::Tensor>& grad_mem,
    const at::Tensor& act_cnt, const at::Tensor& act_idx, const at::Tensor& act_sg,
    const at::Tensor& act_p, const at::Tensor& act_q, const at::Tensor& act_u,
    const at::Tensor& tan_last, const c10::optional<at::Tensor>& rst_bits,
    const at::Tensor& alpha, const c10::optional<at::Tensor>& alpha_syn, bool sparse,
    bool dense_traces, bool need_dv, bool need_dsyn, bool need_dalpha, bool need_dthreshold,
    bool need_dalpha_syn) {
  check_cuda(grad_spikes, "lif_neuron_param_backward", "grad_spikes");
  const c10::cuda::CUDAGuard guard(grad_spikes.device());
  return host::lif_neuron_param_backward<L>(grad_spikes, grad_v_final, grad_syn_final, grad_mem,
                                            act_cnt, act_idx, act_sg, act_p, act_q, act_u,
                                            tan_last, rst_bits, alpha, alpha_syn, sparse,
                                            dense_traces, need_dv, need_dsyn, need_dalpha,
                                            need_dthreshold, need_dalpha_syn);
}

host::NeuronGrads lif_neuron_backward_cuda(
    const at::Tensor& grad_spikes, const c10::optional<at::Tensor>& grad_v_final,
    const c10::optional<at::Tensor>& grad_mem, const at::Tensor& act_cnt, const at::Tensor& act_idx,
    const at::Tensor& act_sg, const c10::optional<at::Tensor>& act_rg,
    const c10::optional<at::Tensor>& rst_bits, double alpha, bool sparse, bool need_dv,
    c10::string_view dynamics, double input_scale) {
  check_cuda(grad_spikes, "lif_neuron_backward", "grad_spikes");
  const c10::cuda::CUDAGuard guard(grad_spikes.device());
  return host::lif_neuron_backward<L>(grad_spikes, grad_v_final, grad_mem, act_cnt, act_idx, act_sg,
                                      act_rg, rst_bits, alpha, sparse, need_dv, dynamics,
                                      input_scale);
}

host::RlifOutputs rlif_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                                    const at::Tensor& rec_weight, const c10::optional<at::Tensor>& bias,
                                    const c10::optional<at::Tensor>& v_init,
                                    const c10::optional<at::Tensor>& s_init,
                                    const c10::optional<at::Tensor>& x_act_cnt,
                                    const c10::optional<at::Tensor>& x_act_idx, double alpha,
                                    double threshold, double b_th, double slope, bool sparse,
                                    c10::string_view surrogate, c10::string_view reset) {
  check_cuda(x, "rlif_forward", "x");
  const c10::cuda::CUDAGuard guard(x.device());
  return host::rlif_forward<L>(x, weight, rec_weight, bias, v_init, s_init, x_act_cnt, x_act_idx,
                               alpha, threshold, b_th, slope, sparse, surrogate, reset);
}

host::RlifGrads rlif_backward_sparse_cuda(
    const at::Tensor& grad_spikes, const c10::optional<at::Tensor>& grad_v_final,
    const at::Tensor& weight, const at::Tensor& rec_weight, const c10::optional<at::Tensor>& s_init,
    const at::Tensor& act_cnt, const at::Tensor& act_idx, const at::Tensor& act_sg,
    const at::Tensor& ev_cnt, const at::Tensor& ev_idx, const at::Tensor& ev_val,
    const at::Tensor& spk_bits, const c10::optional<at::Tensor>& prev_cnt,
    const c10::optional<at::Tensor>& prev_idx, double alpha, c10::string_view reset, bool need_dx,
    bool need_dw, bool need_drec, bool need_db, bool need_dv, bool need_ds) {
  check_cuda(grad_spikes, "rlif_backward_sparse", "grad_spikes");
  const c10::cuda::CUDAGuard guard(grad_spikes.device());
  return host::rlif_backward_sparse<L>(grad_spikes, grad_v_final, weight, rec_weight, s_init, act_cnt,
                                       act_idx, act_sg, ev_cnt, ev_idx, ev_val, spk_bits, prev_cnt,
                                       prev_idx, alpha, reset, need_dx, need_dw, need_drec, need_db,
                                       need_dv, need_ds);
}

host::RlifGrads rlif_backward_dense_cuda(const at::Tensor& grad_spikes,
                                         const c10::optional<at::Tensor>& grad_v_final,
                                         const at::Tensor& x, const at::Tensor& weight,
                                         const at::Tensor& rec_weight,
                                         const c10::optional<at::Tensor>& s_init,
                                         const at::Tensor& spikes, const at::Tensor& sg,
                                         double alpha, c10::string_view reset, bool need_dx,
                                         bool need_dw, bool need_drec, bool need_db, bool need_dv,
                                         bool need_ds) {
  check_cuda(grad_spikes, "rlif_backward_dense", "grad_spikes");
  const c10::cuda::CUDAGuard guard(grad_spikes.device());
  return host::rlif_backward_dense<L>(grad_spikes, grad_v_final, x, weight, rec_weight, s_init, spikes,
                                      sg, alpha, reset, need_dx, need_dw, need_drec, need_db, need_dv,
                                      need_ds);
}

host::RlifParamOutputs rlif_param_forward_cuda(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& rec_weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& v_init,
    const c10::optional<at::Tensor>& s_init, const c10::optional<at::Tensor>& syn_init,
    const c10::optional<at::Tensor>& x_act_cnt, const c10::optional<at::Tensor>& x_act_idx,
    const at::Tensor& alpha, const at::Tensor& threshold, const c10::optional<at::Tensor>& alpha_syn,
    double b_th, double slope, bool sparse, c10::string_view surrogate, c10::string_view reset,
    bool need_dparams) {
  check_cuda(x, "rlif_param_forward", "x");
  const c10::cuda::CUDAGuard guard(x.device());
  return host::rlif_param_forward<L>(x, weight, rec_weight, bias, v_init, s_init, syn_init, x_act_cnt,
                                     x_act_idx, alpha, threshold, alpha_syn, b_th, slope, sparse,
                                     surrogate, reset, need_dparams);
}

host::RlifParamGrads rlif_param_backward_sparse_cuda(
    const at::Tensor& grad_spikes, const c10::optional<at::Tensor>& grad_v_final,
    const c10::optional<at::Tensor>& grad_syn_final, const at::Tensor& weight,
    const at::Tensor& rec_weight, const c10::optional<at::Tensor>& s_init, const at::Tensor& act_cnt,
    const at::Tensor& act_idx, const at::Tensor& act_sg, const at::Tensor& act_p,
    const at::Tensor& act_q, const at::Tensor& act_u, const at::Tensor& tan_last,
    const at::Tensor& ev_cnt, const at::Tensor& ev_idx, const at::Tensor& ev_val,
    const at::Tensor& spk_bits, const c10::optional<at::Tensor>& prev_cnt,
    const c10::optional<at::Tensor>& prev_idx, const at::Tensor& alpha,
    const c10::optional<at::Tensor>& alpha_syn, c10::string_view reset, bool need_dx, bool need_dw,
    bool need_drec, bool need_db, bool need_dv, bool need_ds, bool need_dsyn, bool need_dparams) {
  check_cuda(grad_spikes, "rlif_param_backward_sparse", "grad_spikes");
  const c10::cuda::CUDAGuard guard(grad_spikes.device());
  return host::rlif_param_backward_sparse<L>(
      grad_spikes, grad_v_final, grad_syn_final, weight, rec_weight, s_init, act_cnt, act_idx, act_sg,
      act_p, act_q, act_u, tan_last, ev_cnt, ev_idx, ev_val, spk_bits, prev_cnt, prev_idx, alpha,
      alpha_syn, reset, need_dx, need_dw, need_drec, need_db, need_dv, need_ds, need_dsyn, need_dparams);
}

host::RlifParamGrads rlif_param_backward_dense_cuda(
    const at::Tensor& grad_spikes, const c10::optional<at::Tensor>& grad_v_final,
    const c10::optional<at::Tensor>& grad_syn_final, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& rec_weight, const c10::optional<at::Tensor>& s_init, const at::Tensor& spikes,
    const at::Tensor& sg, const at::Tensor& act_p, const at::Tensor& act_q, const at::Tensor& act_u,
    const at::Tensor& tan_last, const at::Tensor& alpha, const c10::optional<at::Tensor>& alpha_syn,
    c10::string_view reset, bool need_dx, bool need_dw, bool need_drec, bool need_db, bool need_dv,
    bool need_ds, bool need_dsyn, bool need_dparams) {
  check_cuda(grad_spikes, "rlif_param_backward_dense", "grad_spikes");
  const c10::cuda::CUDAGuard guard(grad_spikes.device());
  return host::rlif_param_backward_dense<L>(
      grad_spikes, grad_v_final, grad_syn_final, x, weight, rec_weight, s_init, spikes, sg, act_p,
      act_q, act_u, tan_last, alpha, alpha_syn, reset, need_dx, need_dw, need_drec, need_db, need_dv,
      need_ds, need_dsyn, need_dparams);
}

// The convolution ops (conv_host.h): dtypes as their CPU kernels (no float32-math wrapper).
std::tuple<at::Tensor, at::Tensor> spike_pack_cuda(const at::Tensor& x) {
  check_cuda(x, "spike_pack", "x");
  const c10::cuda::CUDAGuard guard(x.device());
  return host::spike_pack<L>(x);
}

std::tuple<at::Tensor, at::Tensor> spike_conv2d_forward_cuda(
    const at::Tensor& bits, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    at::IntArrayRef in_shape, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, c10::string_view pool, int64_t pool_k) {
  check_cuda(bits, "spike_conv2d_forward", "bits");
  const c10::cuda::CUDAGuard guard(bits.device());
  return host::spike_conv2d_forward<L>(bits, weight, bias, in_shape, stride, padding, dilation,
                                       groups, pool, pool_k);
}

std::tuple<at::Tensor, at::Tensor> conv_pool2d_cuda(const at::Tensor& y, c10::string_view pool,
                                                    int64_t pool_k) {
  check_cuda(y, "conv_pool2d", "y");
  const c10::cuda::CUDAGuard guard(y.device());
  return host::conv_pool2d<L>(y, pool, pool_k);
}

at::Tensor conv_unpool2d_cuda(const at::Tensor& grad, const at::Tensor& pool_idx,
                              c10::string_view pool, int64_t pool_k, int64_t h, int64_t w) {
  check_cuda(grad, "conv_unpool2d", "grad");
  const c10::cuda::CUDAGuard guard(grad.device());
  return host::conv_unpool2d<L>(grad, pool_idx, pool, pool_k, h, w);
}

host::ConvGrads spike_conv2d_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& pool_idx, const c10::optional<at::Tensor>& bits,
    const at::Tensor& weight, at::IntArrayRef in_shape, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, c10::string_view pool,
    int64_t pool_k, const c10::optional<at::Tensor>& prev_cnt,
    const c10::optional<at::Tensor>& prev_idx, int64_t num_steps, bool need_dx, bool need_dw,
    bool need_db, bool need_grad_conv) {
  check_cuda(grad_out, "spike_conv2d_backward", "grad_out");
  const c10::cuda::CUDAGuard guard(grad_out.device());
  return host::spike_conv2d_backward<L>(grad_out, pool_idx, bits, weight, in_shape, stride, padding,
                                        dilation, groups, pool, pool_k, prev_cnt, prev_idx,
                                        num_steps, need_dx, need_dw, need_db, need_grad_conv);
}

}  // namespace

// Route forcing for tests and route timing (not part of the sparsegrad op set: no CPU kernel).
TORCH_LIBRARY(sparsegrad_cuda, m) {
  m.def("set_routes(int dw_route, int dx_route) -> ()", &set_routes);
  m.def("routes() -> int[]", &get_routes);
}

TORCH_LIBRARY_IMPL(sparsegrad, CUDA, m) {
  m.impl("lif_forward", SG_FLOAT32_MATH(lif_forward_cuda));
  m.impl("lif_backward_sparse", SG_FLOAT32_MATH(lif_backward_sparse_cuda));
  m.impl("lif_backward_dense", SG_FLOAT32_MATH(lif_backward_dense_cuda));
  m.impl("li_readout_forward", SG_FLOAT32_MATH(li_readout_forward_cuda));
  m.impl("li_readout_backward", SG_FLOAT32_MATH(li_readout_backward_cuda));
  m.impl("lif_neuron_forward", SG_FLOAT32_MATH(lif_neuron_forward_cuda));
  m.impl("lif_neuron_backward", SG_FLOAT32_MATH(lif_neuron_backward_cuda));
  m.impl("lif_neuron_param_forward", SG_FLOAT32_MATH(lif_neuron_param_forward_cuda));
  m.impl("lif_neuron_param_backward", SG_FLOAT32_MATH(lif_neuron_param_backward_cuda));
  m.impl("rlif_forward", SG_FLOAT32_MATH(rlif_forward_cuda));
  m.impl("rlif_backward_sparse", SG_FLOAT32_MATH(rlif_backward_sparse_cuda));
  m.impl("rlif_backward_dense", SG_FLOAT32_MATH(rlif_backward_dense_cuda));
  m.impl("rlif_param_forward", SG_FLOAT32_MATH(rlif_param_forward_cuda));
  m.impl("rlif_param_backward_sparse", SG_FLOAT32_MATH(rlif_param_backward_sparse_cuda));
  m.impl("rlif_param_backward_dense", SG_FLOAT32_MATH(rlif_param_backward_dense_cuda));
  m.impl("spike_pack", &spike_pack_cuda);
  m.impl("spike_conv2d_forward", &spike_conv2d_forward_cuda);
  m.impl("conv_pool2d", &conv_pool2d_cuda);
  m.impl("conv_unpool2d", &conv_unpool2d_cuda);
  m.impl("spike_conv2d_backward", &spike_conv2d_backward_cuda);
}

}  // namespace cuda
}  // namespace sparsegrad
