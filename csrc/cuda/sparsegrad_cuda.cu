// CUDA kernels of every sparsegrad op: TORCH_LIBRARY_IMPL(sparsegrad, CUDA). The kernels live in
// csrc/cuda/*.cuh, the host sequence (buffers, launches, scans, GEMMs) in csrc/cuda/host_ops.h,
// both shared with the host emulation that runs them on the CPU in the tests. This file only adds
// what is GPU-specific: the device guard, the current stream and the launch check.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "low_precision.h"

#include "cuda/host_ops.h"
#include "cuda/neuron_host.h"
#include "cuda/recurrent_host.h"

namespace sparsegrad {
namespace cuda {
namespace {

struct CudaLauncher {
  static constexpr bool kHostReadsFlag = false;  // reading it would synchronise: NaN gradients instead
  static int forced_dw_route() { return 0; }     // the cost model of gpu_routes.h decides
  static int forced_dx_route() { return 0; }

  template <typename... KArgs, typename... Args>
  static void launch(int64_t n, void (*kernel)(KArgs...), Args... args) {
    if (n <= 0) return;  // a zero-block launch is an error
    const LaunchShape shape = launch_shape(n);
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

}  // namespace

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
}

}  // namespace cuda
}  // namespace sparsegrad
