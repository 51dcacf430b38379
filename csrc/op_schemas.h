// The op schemas, written once: registered as sparsegrad::* by csrc/ops.cpp and, for the CUDA
// host emulation used in tests, as sparsegrad_emul::* by csrc/emul/emul_ops.cpp.
#pragma once

#include <torch/library.h>

namespace sparsegrad {

inline void define_ops(torch::Library& m) {
  // Compact tensors (every op): a CSR over rows r = b*T + t, as per-row counts *_cnt [B*T] int32
  // and indices *_idx int32 ascending within a row (kernels build int64 offsets internally).
  //
  // Fused LIF forward. Returns the spikes [T,B,N_out], the final membrane [B,N_out], and what the
  // backward needs. Sparse mode: the active set (act_cnt, act_idx neuron index, act_sg surrogate
  // value) and the input as events (ev_cnt, ev_idx input index, ev_val values, empty when x is
  // binary). Dense mode: act_sg holds the surrogate for every entry, [T,B,N_out]; the other
  // compact tensors are empty. rst_bits [T,B,ceil(N_out/32)] int32, only for reset="zero" (else
  // empty): bit j%32 of word j/32 is S[t-1,b,j] (s_init at t = 0), the spike resetting V at t.
  // stats = [spike count, active count, input nonzeros] (int64).
  // x_act_cnt/x_act_idx: the active set of the sparse layer that produced x, if any; the forward
  // ignores them, the backward computes dx only there (sparsegrad/ops.py saves them).
  // surrogate: "fast_sigmoid" | "atan" | "sigmoid" | "triangle"; reset: "subtract" | "zero" | "none".
  m.def(
      "lif_forward(Tensor x, Tensor weight, Tensor? bias, Tensor? v_init, Tensor? s_init, "
      "Tensor? x_act_cnt, Tensor? x_act_idx, float alpha, float threshold, float b_th, float slope, "
      "bool sparse, str surrogate=\"fast_sigmoid\", str reset=\"subtract\") -> "
      "(Tensor spikes, Tensor v_final, Tensor act_cnt, Tensor act_idx, Tensor act_sg, "
      "Tensor ev_cnt, Tensor ev_idx, Tensor ev_val, Tensor rst_bits, Tensor stats)");
  // Sparse LIF backward: work proportional to active entries and input events. prev_cnt/prev_idx,
  // when given, are the active set of the layer that produced x: dx is then computed only there.
  // rst_bits (reset="zero"): the trace is cut where a spike reset V. dw_route: 0 = choose the
  // cheaper, 1 = through input events, 2 = through active entries (not with rst_bits).
  // Gradients not asked for come back as empty tensors.
  m.def(
      "lif_backward_sparse(Tensor grad_spikes, Tensor? grad_v_final, Tensor weight, "
      "Tensor act_cnt, Tensor act_idx, Tensor act_sg, Tensor ev_cnt, Tensor ev_idx, "
      "Tensor ev_val, Tensor? prev_cnt, Tensor? prev_idx, Tensor? rst_bits, float alpha, "
      "bool need_dx, bool need_dw, bool need_db, bool need_dv, int dw_route) -> "
      "(Tensor dx, Tensor dweight, Tensor dbias, Tensor dv_init)");
  // Dense LIF backward (standard surrogate BPTT): reverse-time scan, then two GEMMs.
  m.def(
      "lif_backward_dense(Tensor grad_spikes, Tensor? grad_v_final, Tensor x, Tensor weight, "
      "Tensor sg, Tensor? rst_bits, float alpha, bool need_dx, bool need_dw, bool need_db, "
      "bool need_dv) -> (Tensor dx, Tensor dweight, Tensor dbias, Tensor dv_init)");
  // Leaky-integrator readout. reduce in {"max","sum","mean","none"}. argmax_t [B,N_out] int64
  // (max only, else empty). The input is kept as events, as in lif_forward.
  m.def(
      "li_readout_forward(Tensor x, Tensor weight, Tensor? bias, Tensor? x_act_cnt, "
      "Tensor? x_act_idx, float alpha, str reduce) -> "
      "(Tensor out, Tensor argmax_t, Tensor ev_cnt, Tensor ev_idx, Tensor ev_val)");
  m.def(
      "li_readout_backward(Tensor grad_out, Tensor argmax_t, Tensor weight, Tensor ev_cnt, "
      "Tensor ev_idx, Tensor ev_val, Tensor? prev_cnt, Tensor? prev_idx, int num_steps, "
      "float alpha, str reduce, bool need_dx, bool need_dw, bool need_db) -> "
      "(Tensor dx, Tensor dweight, Tensor dbias)");
  // Recurrent LIF layer (issue 12): V[t] = alpha*V[t-1] + x[t] W^T + S[t-1] R^T + b, with the
  // surrogate's and reset's names as lif_forward's. Compact tensors as lif_forward's (CSRs over
  // rows b*T + t with int32 per-row counts), plus spk_bits [T, B, ceil(N/32)] int32: bit j % 32
  // of word j / 32 of row (t, b) is S[t, b, j] (the backward's recurrent input and, for reset
  // "zero", its reset bits). Dense mode: act_sg is the surrogate everywhere [T, B, N], act_cnt,
  // act_idx and the events are empty. stats = [spike count, active count, input nonzeros].
  m.def(
      "rlif_forward(Tensor x, Tensor weight, Tensor rec_weight, Tensor? bias, Tensor? v_init, "
      "Tensor? s_init, Tensor? x_act_cnt, Tensor? x_act_idx, float alpha, float threshold, "
      "float b_th, float slope, bool sparse, str surrogate=\"fast_sigmoid\", "
      "str reset=\"subtract\") -> (Tensor spikes, Tensor v_final, Tensor act_cnt, "
      "Tensor act_idx, Tensor act_sg, Tensor ev_cnt, Tensor ev_idx, Tensor ev_val, "
      "Tensor spk_bits, Tensor stats)");
  // Sparse backward through the recurrence: work proportional to active entries (|A| * N),
  // spikes (#spikes * N) and input events (nnz * N). s_init: the initial spikes the forward got
  // (they feed the first step through R). prev_cnt/prev_idx: the producer's active set (dx only
  // there). Gradients not asked for come back empty.
  m.def(
      "rlif_backward_sparse(Tensor grad_spikes, Tensor? grad_v_final, Tensor weight, "
      "Tensor rec_weight, Tensor? s_init, Tensor act_cnt, Tensor act_idx, Tensor act_sg, "
      "Tensor ev_cnt, Tensor ev_idx, Tensor ev_val, Tensor spk_bits, Tensor? prev_cnt, "
      "Tensor? prev_idx, float alpha, str reset, bool need_dx, bool need_dw, bool need_drec, "
      "bool need_db, bool need_dv, bool need_ds) -> (Tensor dx, Tensor dweight, "
      "Tensor drec_weight, Tensor dbias, Tensor dv_init, Tensor ds_init)");
  // Dense backward (standard surrogate BPTT through the recurrence): G by a reverse walk, then
  // GEMMs for dW, dR, dx. sg = the forward's act_sg in dense mode.
  m.def(
      "rlif_backward_dense(Tensor grad_spikes, Tensor? grad_v_final, Tensor x, Tensor weight, "
      "Tensor rec_weight, Tensor? s_init, Tensor spikes, Tensor sg, float alpha, str reset, "
      "bool need_dx, bool need_dw, bool need_drec, bool need_db, bool need_dv, bool need_ds) -> "
      "(Tensor dx, Tensor dweight, Tensor drec_weight, Tensor dbias, Tensor dv_init, "
      "Tensor ds_init)");
}

}  // namespace sparsegrad
