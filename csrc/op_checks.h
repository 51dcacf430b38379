// Argument checks of every op, written once for the CPU kernels and the CUDA host code. The
// Python wrappers check first with the friendliest messages; these guard direct torch.ops callers.
// Every message names the op and the argument.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <string>
#include <utility>

#include "compact.h"
#include "lif_math.h"

namespace sparsegrad {


inline void check_float_tensor(const at::Tensor& t, const char* op, const char* name, int64_t dim) {
  SG_CHECK(t.dim() == dim, op, name, "must have ", dim, " dimensions, got ", t.sizes());
  const auto dt = t.scalar_type();
  SG_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op, name,
           "must be float32, float64, float16 or bfloat16, got ", dt);
}

inline void check_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  SG_CHECK(t.device() == ref.device(), op, name, "is on ", t.device(), " but the other inputs are on ",
           ref.device());
}

inline void check_like(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  SG_CHECK(t.scalar_type() == x.scalar_type(), op, name, "must have the dtype of x (",
           x.scalar_type(), "), got ", t.scalar_type());
  check_device(t, x, op, name);
}

// x [T,B,N_in], weight [N_out,N_in], bias [N_out]
inline void check_linear(const at::Tensor& x, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias, const char* op) {
  check_float_tensor(x, op, "x", 3);
  check_float_tensor(weight, op, "weight", 2);
  check_like(weight, x, op, "weight");
  SG_CHECK(weight.size(1) == x.size(2), op, "weight",
           "must be [N_out, N_in] with N_in = x.size(2) = ", x.size(2), ", got ", weight.sizes());
  // neuron and input indices are stored as int32
  SG_CHECK(weight.size(0) < (int64_t(1) << 31) && weight.size(1) < (int64_t(1) << 31), op, "weight",
           "must have fewer than 2^31 rows and columns, got ", weight.sizes());
  if (bias.has_value()) {
    check_float_tensor(*bias, op, "bias", 1);
    check_like(*bias, x, op, "bias");
    SG_CHECK(bias->size(0) == weight.size(0), op, "bias", "must have shape [", weight.size(0),
             "], got ", bias->sizes());
  }
}

inline void check_alpha(double alpha, const char* op) {
  SG_CHECK(alpha >= 0.0 && alpha <= 1.0, op, "alpha", "must be in [0, 1], got ", alpha);
}

// A CSR over rows r = b*T + t as per-row counts (cnt [B*T] int32) and indices (idx int32,
// ascending within a row), as made by the forward ops. Checks shapes, dtypes and devices; the
// contents are checked by row_offsets (counts) and by the kernels (index ranges).
inline void check_csr(const at::Tensor& cnt, const at::Tensor& idx, int64_t rows, const at::Tensor& ref,
                      const char* op, const char* cnt_name, const char* idx_name) {
  SG_CHECK(cnt.dim() == 1 && cnt.scalar_type() == at::kInt && cnt.numel() == rows, op, cnt_name,
           "must hold int32 per-row counts of length B*T = ", rows, ", got ", cnt.scalar_type(),
           " ", cnt.sizes());
  SG_CHECK(idx.dim() == 1 && idx.scalar_type() == at::kInt, op, idx_name,
           "must be a 1-D int32 index tensor, got ", idx.scalar_type(), " ", idx.sizes());
  check_device(cnt, ref, op, cnt_name);
  check_device(idx, ref, op, idx_name);
}

inline void check_optional_csr(const c10::optional<at::Tensor>& cnt, const c10::optional<at::Tensor>& idx,
                               int64_t rows, const at::Tensor& ref, const char* op) {
  SG_CHECK(cnt.has_value() == idx.has_value(), op, "prev_cnt", "and prev_idx must be given together");
  if (cnt.has_value()) check_csr(*cnt, *idx, rows, ref, op, "prev_cnt", "prev_idx");
}

inline void check_rst_bits(const c10::optional<at::Tensor>& bits, int64_t T, int64_t B, int64_t N,
                           const at::Tensor& ref, const char* op) {
  if (!bits.has_value()) return;
  SG_CHECK(bits->scalar_type() == at::kInt && bits->dim() == 3 && bits->size(0) == T &&
               bits->size(1) == B && bits->size(2) == bit_words(N),
           op, "rst_bits", "must be int32 [T, B, ceil(N/32)] = [", T, ", ", B, ", ", bit_words(N),
           "], got ", bits->scalar_type(), " ", bits->sizes());
  check_device(*bits, ref, op, "rst_bits");
}


// Input events: values empty (binary input) or one per event.
inline void check_event_values(const at::Tensor& ev_val, const at::Tensor& ev_idx, const at::Tensor& ref,
                               const char* op) {
  SG_CHECK(ev_val.numel() == 0 || ev_val.numel() == ev_idx.numel(), op, "ev_val",
           "must be empty (binary input) or match ev_idx, got ", ev_val.numel());
  if (ev_val.numel() > 0) check_like(ev_val, ref, op, "ev_val");
}

inline ReduceKind parse_reduce(c10::string_view reduce, const char* op) {
  if (reduce == "max") return kReduceMax;
  if (reduce == "sum") return kReduceSum;
  if (reduce == "mean") return kReduceMean;
  if (reduce == "none") return kReduceNone;
  SG_CHECK(false, op, "reduce", "must be one of 'max', 'sum', 'mean', 'none', got '",
           std::string(reduce), "'");
  return kReduceNone;
}

inline SurrogateKind parse_surrogate(c10::string_view name, const char* op) {
  if (name == "fast_sigmoid") return kFastSigmoid;
  if (name == "atan") return kAtan;
  if (name == "sigmoid") return kSigmoid;
  if (name == "triangle") return kTriangle;
  SG_CHECK(false, op, "surrogate", "must be one of 'fast_sigmoid', 'atan', 'sigmoid', 'triangle', got '",
           std::string(name), "'");
  return kFastSigmoid;
}

inline ResetKind parse_reset(c10::string_view name, const char* op) {
  if (name == "subtract") return kResetSubtract;
  if (name == "zero") return kResetZero;
  if (name == "none") return kResetNone;
  SG_CHECK(false, op, "reset", "must be one of 'subtract', 'zero', 'none', got '", std::string(name), "'");
  return kResetSubtract;
}

// ------------------------------------------------------------------------------------------
// One validator per op.
// ------------------------------------------------------------------------------------------
struct NeuronKinds {
  SurrogateKind surrogate;
  ResetKind reset;
};

// Checks the neuron's hyper-parameters (shared by every op with LIF neurons).
inline NeuronKinds check_neuron_args(double alpha, double threshold, double b_th, double slope,
                                     c10::string_view surrogate, c10::string_view reset, const char* op) {
  check_alpha(alpha, op);
  SG_CHECK(threshold > 0, op, "threshold", "must be > 0, got ", threshold);
  SG_CHECK(b_th > 0, op, "b_th", "must be > 0 (inf for no mask), got ", b_th);
  SG_CHECK(slope > 0, op, "slope", "must be > 0, got ", slope);
  return {parse_surrogate(surrogate, op), parse_reset(reset, op)};
}

// v_init / s_init [B, N]
inline void check_state(const c10::optional<at::Tensor>& v_init, const c10::optional<at::Tensor>& s_init,
                        const at::Tensor& x, int64_t B, int64_t n, const char* op) {
  for (const auto& [state, name] : {std::pair{&v_init, "v_init"}, std::pair{&s_init, "s_init"}}) {
    if (state->has_value()) {
      check_float_tensor(**state, op, name, 2);
      check_like(**state, x, op, name);
      SG_CHECK((*state)->size(0) == B && (*state)->size(1) == n, op, name, "must have shape [",
               B, ", ", n, "], got ", (*state)->sizes());
    }
  }
}

inline NeuronKinds check_lif_forward_args(const at::Tensor& x, const at::Tensor& weight,
                                          const c10::optional<at::Tensor>& bias,
                                          const c10::optional<at::Tensor>& v_init,
                                          const c10::optional<at::Tensor>& s_init, double alpha,
                                          double threshold, double b_th, double slope,
                                          c10::string_view surrogate, c10::string_view reset) {
  const char* op = "lif_forward";
  check_linear(x, weight, bias, op);
  const NeuronKinds kinds = check_neuron_args(alpha, threshold, b_th, slope, surrogate, reset, op);
  check_state(v_init, s_init, x, x.size(1), weight.size(0), op);
  return kinds;
}

inline void check_lif_grad_inputs(const at::Tensor& grad_spikes,
                                  const c10::optional<at::Tensor>& grad_v_final,
                                  const at::Tensor& weight, double alpha, const char* op) {
  check_float_tensor(grad_spikes, op, "grad_spikes", 3);
  check_float_tensor(weight, op, "weight", 2);
  check_like(weight, grad_spikes, op, "weight");
  check_alpha(alpha, op);
  SG_CHECK(grad_spikes.size(2) == weight.size(0), op, "grad_spikes", "must be [T, B, ",
           weight.size(0), "], got ", grad_spikes.sizes());
  if (grad_v_final.has_value()) {
    check_like(*grad_v_final, grad_spikes, op, "grad_v_final");
    SG_CHECK(grad_v_final->dim() == 2 && grad_v_final->size(0) == grad_spikes.size(1) &&
                 grad_v_final->size(1) == weight.size(0),
             op, "grad_v_final", "must be [B, N_out], got ", grad_v_final->sizes());
  }
}

inline void check_lif_backward_sparse_args(
    const at::Tensor& grad_spikes, const c10::optional<at::Tensor>& grad_v_final,
    const at::Tensor& weight, const at::Tensor& act_cnt, const at::Tensor& act_idx,
    const at::Tensor& act_sg, const at::Tensor& ev_cnt, const at::Tensor& ev_idx,
    const at::Tensor& ev_val, const c10::optional<at::Tensor>& prev_cnt,
    const c10::optional<at::Tensor>& prev_idx, const c10::optional<at::Tensor>& rst_bits,
    double alpha, int64_t dw_route) {
  const char* op = "lif_backward_sparse";
  check_lif_grad_inputs(grad_spikes, grad_v_final, weight, alpha, op);
  SG_CHECK(dw_route >= 0 && dw_route <= 2, op, "dw_route",
           "must be 0 (auto), 1 (events) or 2 (active), got ", dw_route);
  SG_CHECK(!(rst_bits.has_value() && dw_route == 2), op, "dw_route",
           "must not be 2 (active) with rst_bits: reset-to-zero needs the events route");
  const int64_t T = grad_spikes.size(0), B = grad_spikes.size(1), rows = T * B;
  check_csr(act_cnt, act_idx, rows, grad_spikes, op, "act_cnt", "act_idx");
  check_csr(ev_cnt, ev_idx, rows, grad_spikes, op, "ev_cnt", "ev_idx");
  check_like(act_sg, grad_spikes, op, "act_sg");
  SG_CHECK(act_sg.numel() == act_idx.numel(), op, "act_sg", "must have one value per active entry (",
           act_idx.numel(), "), got ", act_sg.numel());
  check_event_values(ev_val, ev_idx, grad_spikes, op);
  check_optional_csr(prev_cnt, prev_idx, rows, grad_spikes, op);
  check_rst_bits(rst_bits, T, B, weight.size(0), grad_spikes, op);
}

inline void check_lif_backward_dense_args(const at::Tensor& grad_spikes,
                                          const c10::optional<at::Tensor>& grad_v_final,
                                          const at::Tensor& x, const at::Tensor& weight,
                                          const at::Tensor& sg, const c10::optional<at::Tensor>& rst_bits,
                                          double alpha) {
  const char* op = "lif_backward_dense";
  check_lif_grad_inputs(grad_spikes, grad_v_final, weight, alpha, op);
  check_linear(x, weight, c10::nullopt, op);
  check_like(x, grad_spikes, op, "x");
  // (x's numel alone would let a [B, T, N_in] x through a view: a silently wrong dW)
  SG_CHECK(x.size(0) == grad_spikes.size(0) && x.size(1) == grad_spikes.size(1), op, "x",
           "must be [T, B, N_in] with T, B of grad_spikes ", grad_spikes.sizes(), ", got ", x.sizes());
  SG_CHECK(sg.sizes() == grad_spikes.sizes(), op, "sg", "must match grad_spikes ",
           grad_spikes.sizes(), ", got ", sg.sizes());
  check_like(sg, grad_spikes, op, "sg");
  check_rst_bits(rst_bits, grad_spikes.size(0), grad_spikes.size(1), weight.size(0), grad_spikes, op);
}

inline ReduceKind check_readout_forward_args(const at::Tensor& x, const at::Tensor& weight,
                                             const c10::optional<at::Tensor>& bias, double alpha,
                                             c10::string_view reduce_name) {
  const char* op = "li_readout_forward";
  check_linear(x, weight, bias, op);
  check_alpha(alpha, op);
  const ReduceKind reduce = parse_reduce(reduce_name, op);
  SG_CHECK(x.size(0) > 0 || reduce == kReduceNone, op, "x", "must have at least one time step");
  return reduce;
}

inline ReduceKind check_readout_backward_args(
    const at::Tensor& grad_out, const at::Tensor& argmax, const at::Tensor& weight,
    const at::Tensor& ev_cnt, const at::Tensor& ev_idx, const at::Tensor& ev_val,
    const c10::optional<at::Tensor>& prev_cnt, const c10::optional<at::Tensor>& prev_idx,
    int64_t num_steps, double alpha, c10::string_view reduce_name) {
  const char* op = "li_readout_backward";
  const ReduceKind reduce = parse_reduce(reduce_name, op);
  check_alpha(alpha, op);
  check_float_tensor(grad_out, op, "grad_out", reduce == kReduceNone ? 3 : 2);
  check_float_tensor(weight, op, "weight", 2);
  check_like(weight, grad_out, op, "weight");
  SG_CHECK(num_steps >= 1, op, "num_steps", "must be >= 1, got ", num_steps);
  SG_CHECK(grad_out.size(-1) == weight.size(0), op, "grad_out", "must end in N_out = ",
           weight.size(0), ", got ", grad_out.sizes());
  if (reduce == kReduceNone)
    SG_CHECK(grad_out.size(0) == num_steps, op, "grad_out", "must have num_steps = ", num_steps,
             " time steps, got ", grad_out.sizes());
  if (reduce == kReduceMax) {
    SG_CHECK(argmax.scalar_type() == at::kLong && argmax.sizes() == grad_out.sizes(), op,
             "argmax_t", "must be int64 of shape ", grad_out.sizes(), ", got ", argmax.sizes());
    check_device(argmax, grad_out, op, "argmax_t");
  }
  const int64_t rows = num_steps * grad_out.size(-2);
  check_csr(ev_cnt, ev_idx, rows, grad_out, op, "ev_cnt", "ev_idx");
  check_event_values(ev_val, ev_idx, grad_out, op);
  check_optional_csr(prev_cnt, prev_idx, rows, grad_out, op);
  return reduce;
}

// ------------------------------------------------------------------------------------------
// The LIF neuron op (lif_neuron_forward / lif_neuron_backward).
// ------------------------------------------------------------------------------------------
struct NeuronOpKinds {
  int surrogate, reset, dynamics;
};

inline int parse_dynamics(c10::string_view name, const char* op) {
  if (name == "leaky") return kChargeLeaky;
  if (name == "sj_lif_decay_input") return kChargeSJDecayInput;
  if (name == "sj_lif") return kChargeSJ;
  if (name == "sj_if") return kChargeSJIF;
  SG_CHECK(false, op, "dynamics", "must be one of 'leaky', 'sj_lif_decay_input', 'sj_lif', 'sj_if', "
           "got '", std::string(name), "'");
  return kChargeLeaky;
}

inline NeuronOpKinds check_lif_neuron_forward_args(const at::Tensor& current,
                                                   const c10::optional<at::Tensor>& v_init,
                                                   const c10::optional<at::Tensor>& s_init,
                                                   double alpha, double threshold, double b_th,
                                                   double slope, c10::string_view surrogate,
                                                   c10::string_view reset, bool return_mem,
                                                   c10::string_view dynamics, double tau) {
  const char* op = "lif_neuron_forward";
  check_float_tensor(current, op, "current", 3);
  SG_CHECK(current.size(2) < (int64_t(1) << 31), op, "current",
           "must have fewer than 2^31 neurons per step, got ", current.sizes());
  const NeuronKinds k = check_neuron_args(alpha, threshold, b_th, slope, surrogate, reset, op);
  const NeuronOpKinds kinds{k.surrogate, k.reset, parse_dynamics(dynamics, op)};
  if (kinds.dynamics != kChargeLeaky) {
    SG_CHECK(kinds.reset != kResetNone, op, "reset", "must be 'subtract' (soft) or 'zero' (hard) "
             "with SpikingJelly dynamics, got 'none'");
    SG_CHECK(!return_mem, op, "return_mem", "is not available with SpikingJelly dynamics");
    SG_CHECK(kinds.dynamics == kChargeSJIF || tau > 1.0, op, "tau", "must be > 1, got ", tau);
  }
  check_state(v_init, s_init, current, current.size(1), current.size(2), op);
  return kinds;
}

// The neuron ops' saved active set: per-row counts [B*T], indices and one surrogate per entry.
inline void check_neuron_active_set(const at::Tensor& act_cnt, const at::Tensor& act_idx,
                                    const at::Tensor& act_sg, const at::Tensor& grad_spikes,
                                    const char* op) {
  const int64_t T = grad_spikes.size(0), B = grad_spikes.size(1);
  SG_CHECK(act_cnt.dim() == 1 && act_cnt.scalar_type() == at::kInt && act_cnt.numel() == B * T, op,
           "act_cnt", "must be int32 [B*T] = [", B * T, "], got ", act_cnt.scalar_type(), " ",
           act_cnt.sizes());
  SG_CHECK(act_idx.dim() == 1 && act_idx.scalar_type() == at::kInt, op, "act_idx",
           "must be a 1-D int32 index tensor, got ", act_idx.scalar_type(), " ", act_idx.sizes());
  check_device(act_cnt, grad_spikes, op, "act_cnt");
  check_device(act_idx, grad_spikes, op, "act_idx");
  SG_CHECK(act_sg.dim() == 1 && act_sg.numel() == act_idx.numel(), op, "act_sg",
           "must have one value per active entry (", act_idx.numel(), "), got ", act_sg.sizes());
}

// The tensor-parameter neuron op: alpha, threshold (and alpha_syn) [N] like current.
inline void check_neuron_param(const at::Tensor& p, const at::Tensor& like, int64_t n,
                               const char* op, const char* name) {
  check_float_tensor(p, op, name, 1);
  check_like(p, like, op, name);
  SG_CHECK(p.size(0) == n, op, name, "must have one value per neuron [", n, "], got ", p.sizes());
}

// The tensor-parameter neuron's arguments for rows of N neurons and B batch elements; `like`
// (the current, or the fused layer's x) gives their dtype and device.
inline NeuronKinds check_neuron_param_args(
    const at::Tensor& like, int64_t B, int64_t N, const c10::optional<at::Tensor>& v_init,
    const c10::optional<at::Tensor>& s_init, const c10::optional<at::Tensor>& syn_init,
    const at::Tensor& alpha, const at::Tensor& threshold, const c10::optional<at::Tensor>& alpha_syn,
    double b_th, double slope, c10::string_view surrogate, c10::string_view reset, const char* op) {
  // alpha and threshold are checked per value by the Python layer (no host sync here)
  const NeuronKinds k = check_neuron_args(0.5, 1.0, b_th, slope, surrogate, reset, op);
  check_neuron_param(alpha, like, N, op, "alpha");
  check_neuron_param(threshold, like, N, op, "threshold");
  if (alpha_syn.has_value()) check_neuron_param(*alpha_syn, like, N, op, "alpha_syn");
  check_state(v_init, s_init, like, B, N, op);
  if (syn_init.has_value()) {
    SG_CHECK(alpha_syn.has_value(), op, "syn_init", "is given but alpha_syn is None (no synaptic current)");
    check_float_tensor(*syn_init, op, "syn_init", 2);
    check_like(*syn_init, like, op, "syn_init");
    SG_CHECK(syn_init->size(0) == B && syn_init->size(1) == N, op, "syn_init", "must have shape [",
             B, ", ", N, "], got ", syn_init->sizes());
  }
  return k;
}

inline NeuronKinds check_lif_neuron_param_forward_args(
    const at::Tensor& current, const c10::optional<at::Tensor>& v_init,
    const c10::optional<at::Tensor>& s_init, const c10::optional<at::Tensor>& syn_init,
    const at::Tensor& alpha, const at::Tensor& threshold, const c10::optional<at::Tensor>& alpha_syn,
    double b_th, double slope, c10::string_view surrogate, c10::string_view reset) {
  const char* op = "lif_neuron_param_forward";
  check_float_tensor(current, op, "current", 3);
  SG_CHECK(current.size(2) < (int64_t(1) << 31), op, "current",
           "must have fewer than 2^31 neurons per step, got ", current.sizes());
  return check_neuron_param_args(current, current.size(1), current.size(2), v_init, s_init,
                                 syn_init, alpha, threshold, alpha_syn, b_th, slope, surrogate,
                                 reset, op);
}

// The fused tensor-parameter layer: x [T, B, N_in], weight [N_out, N_in], bias, and the
// neuron's arguments for N_out neurons.
inline NeuronKinds check_lif_param_forward_args(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& v_init, const c10::optional<at::Tensor>& s_init,
    const c10::optional<at::Tensor>& syn_init, const at::Tensor& alpha, const at::Tensor& threshold,
    const c10::optional<at::Tensor>& alpha_syn, double b_th, double slope,
    c10::string_view surrogate, c10::string_view reset) {
  const char* op = "lif_param_forward";
  check_linear(x, weight, bias, op);
  return check_neuron_param_args(x, x.size(1), weight.size(0), v_init, s_init, syn_init, alpha,
                                 threshold, alpha_syn, b_th, slope, surrogate, reset, op);
}

// Which traces the tensor-parameter forward keeps, and where (the same on every device).
struct TraceNeeds {
  bool keep[3];       // P (alpha), Q (threshold: subtract reset only, else Q = 0), U (alpha_syn)
  bool any;           // some parameter needs a gradient: the last values [4, B, N] are kept
  bool dense_traces;  // at every entry [T, B, N] (dense backward, return_mem), not per active one
};

inline TraceNeeds trace_needs(bool need_dalpha, bool need_dthreshold, bool need_dalpha_syn,
                              bool has_syn, int reset, bool sparse, bool return_mem) {
  TraceNeeds n{{need_dalpha, need_dthreshold && reset == kResetSubtract,
                need_dalpha_syn && has_syn},
               false, !sparse || return_mem};
  n.any = need_dalpha || need_dthreshold || n.keep[2];
  return n;
}

inline void check_trace(const at::Tensor& t, const at::Tensor& like, bool needed, int64_t n,
                        const char* op, const char* name) {
  check_like(t, like, op, name);
  SG_CHECK(!needed || t.numel() == n, op, name,
           "must have one value per saved entry (", n, "), got ", t.sizes());
}

// Returns whether rst_bits was given.
inline bool check_lif_neuron_param_backward_args(
    const at::Tensor& grad_spikes, const c10::optional<at::Tensor>& grad_v_final,
    const c10::optional<at::Tensor>& grad_syn_final, const c10::optional<at::Tensor>& grad_mem,
    const at::Tensor& act_cnt, const at::Tensor& act_idx, const at::Tensor& act_sg,
    const at::Tensor& act_p, const at::Tensor& act_q, const at::Tensor& act_u,
    const at::Tensor& tan_last, const c10::optional<at::Tensor>& rst_bits, const at::Tensor& alpha,
    const c10::optional<at::Tensor>& alpha_syn, bool sparse, bool dense_traces, bool need_dsyn,
    bool need_dalpha, bool need_dthreshold, bool need_dalpha_syn,
    const char* op = "lif_neuron_param_backward") {
  check_float_tensor(grad_spikes, op, "grad_spikes", 3);
  const int64_t T = grad_spikes.size(0), B = grad_spikes.size(1), N = grad_spikes.size(2);
  check_neuron_param(alpha, grad_spikes, N, op, "alpha");
  if (alpha_syn.has_value()) check_neuron_param(*alpha_syn, grad_spikes, N, op, "alpha_syn");
  SG_CHECK(!need_dsyn || alpha_syn.has_value(), op, "need_dsyn", "needs alpha_syn");
  SG_CHECK(!need_dalpha_syn || alpha_syn.has_value(), op, "need_dalpha_syn", "needs alpha_syn");
  for (const auto& [t, name] : {std::pair{&grad_v_final, "grad_v_final"},
                                std::pair{&grad_syn_final, "grad_syn_final"}}) {
    if (t->has_value()) {
      check_like(**t, grad_spikes, op, name);
      SG_CHECK((*t)->dim() == 2 && (*t)->size(0) == B && (*t)->size(1) == N, op, name, "must be [",
               B, ", ", N, "], got ", (*t)->sizes());
    }
  }
  SG_CHECK(!grad_syn_final.has_value() || alpha_syn.has_value(), op, "grad_syn_final",
           "is given but alpha_syn is None");
  if (grad_mem.has_value()) {
    check_like(*grad_mem, grad_spikes, op, "grad_mem");
    SG_CHECK(grad_mem->sizes() == grad_spikes.sizes(), op, "grad_mem", "must match grad_spikes ",
             grad_spikes.sizes(), ", got ", grad_mem->sizes());
    SG_CHECK(dense_traces || !(need_dalpha || need_dthreshold || need_dalpha_syn), op, "grad_mem",
             "needs the traces of every entry (dense_traces) for the parameter gradients");
  }
  check_like(act_sg, grad_spikes, op, "act_sg");
  int64_t entries = T * B * N;
  if (sparse) {
    check_neuron_active_set(act_cnt, act_idx, act_sg, grad_spikes, op);
    if (!dense_traces) entries = act_idx.numel();
  } else {
    SG_CHECK(dense_traces, op, "dense_traces", "must be true with the dense backward");
    SG_CHECK(act_sg.sizes() == grad_spikes.sizes(), op, "act_sg", "must be [T, B, N] ",
             grad_spikes.sizes(), " in dense mode, got ", act_sg.sizes());
  }
  check_trace(act_p, grad_spikes, need_dalpha, entries, op, "act_p");
  // act_q may be empty: Q = 0 under the zero and none resets
  check_trace(act_q, grad_spikes, need_dthreshold && act_q.numel() > 0, entries, op, "act_q");
  check_trace(act_u, grad_spikes, need_dalpha_syn, entries, op, "act_u");
  if (need_dalpha || need_dthreshold || need_dalpha_syn) {
    check_like(tan_last, grad_spikes, op, "tan_last");
    SG_CHECK(tan_last.dim() == 3 && tan_last.size(0) == 4 && tan_last.size(1) == B &&
             tan_last.size(2) == N, op, "tan_last", "must be [4, ", B, ", ", N, "], got ",
             tan_last.sizes());
  }
  const bool has_rst = rst_bits.has_value() && rst_bits->numel() > 0;
  if (has_rst) {
    SG_CHECK(rst_bits->scalar_type() == at::kInt && rst_bits->dim() == 3 && rst_bits->size(0) == T &&
             rst_bits->size(1) == B && rst_bits->size(2) == bit_words(N), op, "rst_bits",
             "must be int32 [T, B, ceil(N/32)] = [", T, ", ", B, ", ", bit_words(N), "], got ",
             rst_bits->scalar_type(), " ", rst_bits->sizes());
    check_device(*rst_bits, grad_spikes, op, "rst_bits");
  }
  return has_rst;
}

// The fused tensor-parameter layer's backward: the neuron backward's arguments for the
// N_out = weight.size(0) neurons, x's events (rows b*T + t) and the producer's active set, which
// dx needs (dx is computed there only). Returns whether rst_bits was given.
inline bool check_lif_param_backward_args(
    const at::Tensor& grad_spikes, const c10::optional<at::Tensor>& grad_v_final,
    const c10::optional<at::Tensor>& grad_syn_final, const c10::optional<at::Tensor>& grad_mem,
    const at::Tensor& act_cnt, const at::Tensor& act_idx, const at::Tensor& act_sg,
    const at::Tensor& act_p, const at::Tensor& act_q, const at::Tensor& act_u,
    const at::Tensor& tan_last, const c10::optional<at::Tensor>& rst_bits, const at::Tensor& alpha,
    const c10::optional<at::Tensor>& alpha_syn, const at::Tensor& weight, const at::Tensor& ev_cnt,
    const at::Tensor& ev_idx, const at::Tensor& ev_val, const c10::optional<at::Tensor>& prev_cnt,
    const c10::optional<at::Tensor>& prev_idx, bool sparse, bool dense_traces, bool need_dx,
    bool need_dsyn, bool need_dalpha, bool need_dthreshold, bool need_dalpha_syn) {
  const char* op = "lif_param_backward";
  const bool has_rst = check_lif_neuron_param_backward_args(
      grad_spikes, grad_v_final, grad_syn_final, grad_mem, act_cnt, act_idx, act_sg, act_p, act_q,
      act_u, tan_last, rst_bits, alpha, alpha_syn, sparse, dense_traces, need_dsyn, need_dalpha,
      need_dthreshold, need_dalpha_syn, op);
  check_float_tensor(weight, op, "weight", 2);
  check_like(weight, grad_spikes, op, "weight");
  SG_CHECK(weight.size(0) == grad_spikes.size(2), op, "weight", "must have N_out = ",
           grad_spikes.size(2), " rows (grad_spikes' last dim), got ", weight.sizes());
  const int64_t rows = grad_spikes.size(0) * grad_spikes.size(1);
  check_csr(ev_cnt, ev_idx, rows, grad_spikes, op, "ev_cnt", "ev_idx");
  check_event_values(ev_val, ev_idx, grad_spikes, op);
  check_optional_csr(prev_cnt, prev_idx, rows, grad_spikes, op);
  SG_CHECK(!need_dx || prev_cnt.has_value(), op, "need_dx",
           "needs the producer's active set (prev_cnt, prev_idx); without one dx is dense: "
           "lif_neuron_param_backward's grad_current @ weight");
  return has_rst;
}

// Returns whether rst_bits was given (reset="zero" in the forward).
inline bool check_lif_neuron_backward_args(const at::Tensor& grad_spikes,
                                           const c10::optional<at::Tensor>& grad_v_final,
                                           const c10::optional<at::Tensor>& grad_mem,
                                           const at::Tensor& act_cnt, const at::Tensor& act_idx,
                                           const at::Tensor& act_sg,
                                           const c10::optional<at::Tensor>& act_rg,
                                           const c10::optional<at::Tensor>& rst_bits, double alpha,
                                           bool sparse, c10::string_view dynamics) {
  const char* op = "lif_neuron_backward";
  parse_dynamics(dynamics, op);
  check_float_tensor(grad_spikes, op, "grad_spikes", 3);
  check_alpha(alpha, op);
  const int64_t T = grad_spikes.size(0), B = grad_spikes.size(1), N = grad_spikes.size(2);
  if (grad_v_final.has_value()) {
    check_like(*grad_v_final, grad_spikes, op, "grad_v_final");
    SG_CHECK(grad_v_final->dim() == 2 && grad_v_final->size(0) == B && grad_v_final->size(1) == N,
             op, "grad_v_final", "must be [", B, ", ", N, "], got ", grad_v_final->sizes());
  }
  if (grad_mem.has_value()) {
    check_like(*grad_mem, grad_spikes, op, "grad_mem");
    SG_CHECK(grad_mem->sizes() == grad_spikes.sizes(), op, "grad_mem", "must match grad_spikes ",
             grad_spikes.sizes(), ", got ", grad_mem->sizes());
  }
  check_like(act_sg, grad_spikes, op, "act_sg");
  if (sparse) {
    check_neuron_active_set(act_cnt, act_idx, act_sg, grad_spikes, op);
  } else {
    SG_CHECK(act_sg.sizes() == grad_spikes.sizes(), op, "act_sg",
             "must be the dense surrogate of shape ", grad_spikes.sizes(), ", got ", act_sg.sizes());
  }
  if (act_rg.has_value() && act_rg->numel() > 0) {
    check_like(*act_rg, grad_spikes, op, "act_rg");
    SG_CHECK(act_rg->sizes() == act_sg.sizes(), op, "act_rg", "must match act_sg ", act_sg.sizes(),
             ", got ", act_rg->sizes());
  }
  const bool has_rst = rst_bits.has_value() && rst_bits->numel() > 0;
  if (has_rst) {
    SG_CHECK(rst_bits->scalar_type() == at::kInt && rst_bits->dim() == 3 &&
                 rst_bits->size(0) == T && rst_bits->size(1) == B &&
                 rst_bits->size(2) == bit_words(N),
             op, "rst_bits", "must be int32 [", T, ", ", B, ", ", bit_words(N), "], got ",
             rst_bits->scalar_type(), " ", rst_bits->sizes());
    check_device(*rst_bits, grad_spikes, op, "rst_bits");
  }
  return has_rst;
}

// ------------------------------------------------------------------------------------------
// The recurrent LIF layer (rlif_*).
// ------------------------------------------------------------------------------------------
inline void check_rec_weight(const at::Tensor& rec, int64_t n_out, const at::Tensor& like,
                             const char* op) {
  check_float_tensor(rec, op, "rec_weight", 2);
  check_like(rec, like, op, "rec_weight");
  SG_CHECK(rec.size(0) == n_out && rec.size(1) == n_out, op, "rec_weight", "must be [N_out, N_out] = [",
           n_out, ", ", n_out, "], got ", rec.sizes());
}

inline NeuronKinds check_rlif_forward_args(const at::Tensor& x, const at::Tensor& weight,
                                           const at::Tensor& rec_weight,
                                           const c10::optional<at::Tensor>& bias,
                                           const c10::optional<at::Tensor>& v_init,
                                           const c10::optional<at::Tensor>& s_init, double alpha,
                                           double threshold, double b_th, double slope,
                                           c10::string_view surrogate, c10::string_view reset,
                                           const char* op = "rlif_forward") {
  check_linear(x, weight, bias, op);
  check_rec_weight(rec_weight, weight.size(0), x, op);
  const NeuronKinds kinds = check_neuron_args(alpha, threshold, b_th, slope, surrogate, reset, op);
  check_state(v_init, s_init, x, x.size(1), weight.size(0), op);
  return kinds;
}

// The tensor parameters of the recurrent layer: alpha, threshold (and alpha_syn) one value per
// neuron; syn_init only with alpha_syn.
inline void check_rlif_params(const at::Tensor& alpha, const at::Tensor& threshold,
                              const c10::optional<at::Tensor>& alpha_syn,
                              const c10::optional<at::Tensor>& syn_init, const at::Tensor& x,
                              int64_t n, const char* op) {
  check_neuron_param(alpha, x, n, op, "alpha");
  check_neuron_param(threshold, x, n, op, "threshold");
  if (alpha_syn.has_value()) check_neuron_param(*alpha_syn, x, n, op, "alpha_syn");
  if (syn_init.has_value()) {
    SG_CHECK(alpha_syn.has_value(), op, "syn_init", "is given but alpha_syn is None (no synaptic current)");
    check_float_tensor(*syn_init, op, "syn_init", 2);
    check_like(*syn_init, x, op, "syn_init");
    SG_CHECK(syn_init->size(0) == x.size(1) && syn_init->size(1) == n, op, "syn_init",
             "must have shape [", x.size(1), ", ", n, "], got ", syn_init->sizes());
  }
}

// rlif_param_forward's arguments (CPU and CUDA).
inline NeuronKinds check_rlif_param_forward_args(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& rec_weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& v_init,
    const c10::optional<at::Tensor>& s_init, const c10::optional<at::Tensor>& syn_init,
    const at::Tensor& alpha, const at::Tensor& threshold, const c10::optional<at::Tensor>& alpha_syn,
    double b_th, double slope, c10::string_view surrogate, c10::string_view reset) {
  const char* op = "rlif_param_forward";
  const NeuronKinds kinds = check_rlif_forward_args(x, weight, rec_weight, bias, v_init, s_init, 0.5,
                                                  1.0, b_th, slope, surrogate, reset, op);
  check_rlif_params(alpha, threshold, alpha_syn, syn_init, x, weight.size(0), op);
  return kinds;
}

// The tensor-parameter inputs of the recurrent backwards; `entries` is how many values each
// trace holds (the active entries, or T*B*N in dense mode).
inline void check_rlif_param_grad_inputs(const at::Tensor& grad_spikes,
                                         const c10::optional<at::Tensor>& grad_syn_final,
                                         const at::Tensor& alpha,
                                         const c10::optional<at::Tensor>& alpha_syn,
                                         const at::Tensor& act_p, const at::Tensor& act_q,
                                         const at::Tensor& act_u, const at::Tensor& tan_last,
                                         bool need_dsyn, bool need_dparams, int64_t entries,
                                         int64_t n, const char* op) {
  const int64_t B = grad_spikes.size(1);
  check_neuron_param(alpha, grad_spikes, n, op, "alpha");
  if (alpha_syn.has_value()) check_neuron_param(*alpha_syn, grad_spikes, n, op, "alpha_syn");
  SG_CHECK(!need_dsyn || alpha_syn.has_value(), op, "need_dsyn", "needs alpha_syn");
  if (grad_syn_final.has_value()) {
    SG_CHECK(alpha_syn.has_value(), op, "grad_syn_final", "is given but alpha_syn is None");
    check_like(*grad_syn_final, grad_spikes, op, "grad_syn_final");
    SG_CHECK(grad_syn_final->dim() == 2 && grad_syn_final->size(0) == B &&
             grad_syn_final->size(1) == n, op, "grad_syn_final", "must be [", B, ", ", n, "], got ",
             grad_syn_final->sizes());
  }
  check_trace(act_p, grad_spikes, need_dparams, entries, op, "act_p");
  check_trace(act_q, grad_spikes, need_dparams, entries, op, "act_q");
  check_trace(act_u, grad_spikes, need_dparams && alpha_syn.has_value(), entries, op, "act_u");
  check_trace(tan_last, grad_spikes, need_dparams, 4 * B * n, op, "tan_last");
}

inline void check_rlif_grad_inputs(const at::Tensor& grad_spikes,
                                   const c10::optional<at::Tensor>& grad_v_final,
                                   const at::Tensor& weight, const at::Tensor& rec_weight,
                                   const c10::optional<at::Tensor>& s_init, double alpha,
                                   const char* op) {
  check_lif_grad_inputs(grad_spikes, grad_v_final, weight, alpha, op);
  check_rec_weight(rec_weight, weight.size(0), grad_spikes, op);
  if (s_init.has_value()) {  // (no check_state(nullopt, ...): GCC 12 warns on the temporary)
    check_float_tensor(*s_init, op, "s_init", 2);
    check_like(*s_init, grad_spikes, op, "s_init");
    SG_CHECK(s_init->size(0) == grad_spikes.size(1) && s_init->size(1) == weight.size(0), op,
             "s_init", "must have shape [", grad_spikes.size(1), ", ", weight.size(0), "], got ",
             s_init->sizes());
  }
}

// spk_bits: S[t] bit-packed, int32 [T, B, ceil(N/32)] (bit j % 32 of word j / 32).
inline void check_spike_bits(const at::Tensor& bits, const at::Tensor& grad_spikes, const char* op) {
  const int64_t T = grad_spikes.size(0), B = grad_spikes.size(1), words = bit_words(grad_spikes.size(2));
  SG_CHECK(bits.scalar_type() == at::kInt && bits.dim() == 3 && bits.size(0) == T &&
               bits.size(1) == B && bits.size(2) == words,
           op, "spk_bits", "must be int32 [T, B, ceil(N/32)] = [", T, ", ", B, ", ", words, "], got ",
           bits.scalar_type(), " ", bits.sizes());
  check_device(bits, grad_spikes, op, "spk_bits");
}

// Returns the reset kind; the int64 offsets of the CSRs (row_offsets: counts checked on the host)
// come back through the pointers unless they are null.
inline ResetKind check_rlif_backward_sparse_args(
    const at::Tensor& grad_spikes, const c10::optional<at::Tensor>& grad_v_final,
    const at::Tensor& weight, const at::Tensor& rec_weight, const c10::optional<at::Tensor>& s_init,
    const at::Tensor& act_cnt, const at::Tensor& act_idx, const at::Tensor& act_sg,
    const at::Tensor& ev_cnt, const at::Tensor& ev_idx, const at::Tensor& ev_val,
    const at::Tensor& spk_bits, const c10::optional<at::Tensor>& prev_cnt,
    const c10::optional<at::Tensor>& prev_idx, double alpha, c10::string_view reset,
    at::Tensor* act_off, at::Tensor* ev_off, c10::optional<at::Tensor>* prev_off,
    const char* op = "rlif_backward_sparse") {
  check_rlif_grad_inputs(grad_spikes, grad_v_final, weight, rec_weight, s_init, alpha, op);
  const int64_t rows = grad_spikes.size(0) * grad_spikes.size(1);
  check_csr(act_cnt, act_idx, rows, grad_spikes, op, "act_cnt", "act_idx");
  check_csr(ev_cnt, ev_idx, rows, grad_spikes, op, "ev_cnt", "ev_idx");
  check_like(act_sg, grad_spikes, op, "act_sg");
  SG_CHECK(act_sg.numel() == act_idx.numel(), op, "act_sg", "must have one value per active entry (",
           act_idx.numel(), "), got ", act_sg.numel());
  check_event_values(ev_val, ev_idx, grad_spikes, op);
  check_spike_bits(spk_bits, grad_spikes, op);
  check_optional_csr(prev_cnt, prev_idx, rows, grad_spikes, op);
  if (act_off) {  // null: the caller checks the CSRs itself (the CUDA ops: on the device)
    *act_off = row_offsets(act_cnt, act_idx.numel(), weight.size(0), op, "act_cnt");
    check_columns(*act_off, act_idx, weight.size(0), op, "act_idx");
    *ev_off = row_offsets(ev_cnt, ev_idx.numel(), weight.size(1), op, "ev_cnt");
    check_columns(*ev_off, ev_idx, weight.size(1), op, "ev_idx");
    if (prev_cnt.has_value()) {
      *prev_off = row_offsets(*prev_cnt, prev_idx->numel(), weight.size(1), op, "prev_cnt");
      check_columns(**prev_off, *prev_idx, weight.size(1), op, "prev_idx");
    }
  }
  return parse_reset(reset, op);
}

inline ResetKind check_rlif_backward_dense_args(const at::Tensor& grad_spikes,
                                                const c10::optional<at::Tensor>& grad_v_final,
                                                const at::Tensor& x, const at::Tensor& weight,
                                                const at::Tensor& rec_weight,
                                                const c10::optional<at::Tensor>& s_init,
                                                const at::Tensor& spikes, const at::Tensor& sg,
                                                double alpha, c10::string_view reset,
                                                const char* op = "rlif_backward_dense") {
  check_rlif_grad_inputs(grad_spikes, grad_v_final, weight, rec_weight, s_init, alpha, op);
  check_linear(x, weight, c10::nullopt, op);
  check_like(x, grad_spikes, op, "x");
  SG_CHECK(x.size(0) == grad_spikes.size(0) && x.size(1) == grad_spikes.size(1), op, "x",
           "must be [T, B, N_in] with T, B of grad_spikes ", grad_spikes.sizes(), ", got ", x.sizes());
  for (const auto& [t, name] : {std::pair{&spikes, "spikes"}, std::pair{&sg, "sg"}}) {
    SG_CHECK(t->sizes() == grad_spikes.sizes(), op, name, "must match grad_spikes ",
             grad_spikes.sizes(), ", got ", t->sizes());
    check_like(*t, grad_spikes, op, name);
  }
  return parse_reset(reset, op);
}

}  // namespace sparsegrad
