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
  // The LIF neuron alone, after any layer: current [T, B, N] (any per-step layer's output, trailing
  // dims flattened) -> spikes [T, B, N], v_final [B, N]. Sparse mode: the active set as a CSR over
  // rows r = b*T + t (act_cnt [B*T] int32 entries per row, act_idx int32 neuron index ascending in
  // a row, act_sg the surrogate there); dense mode: act_sg [T, B, N], act_cnt/act_idx empty.
  // rst_bits [T, B, ceil(N/32)] int32 for reset="zero" (bit j%32 of word j/32 of row (t, b) is
  // S[t-1, b, j], S[-1] = s_init), else empty. mem [T, B, N] the membrane trace when return_mem,
  // else empty. stats = [spike count, active count, nonzero currents] (int64).
  // dynamics: "leaky" (sparsegrad's and snnTorch's neuron, the default) or SpikingJelly's
  // "sj_lif_decay_input" / "sj_lif" / "sj_if" (charge H from the post-reset V with tau and v_reset,
  // spike at H >= threshold, reset "subtract" (soft) or "zero" (hard, to v_reset) in the same step;
  // rst_bits row t then holds S[t]; v_final is the post-reset V). act_rg: with
  // detach_reset=False, the reset's own gradient term per saved entry (soft: -threshold*sg,
  // hard: (v_reset - H)*sg), else empty.
  m.def(
      "lif_neuron_forward(Tensor current, Tensor? v_init, Tensor? s_init, float alpha, "
      "float threshold, float b_th, float slope, bool sparse, str surrogate=\"fast_sigmoid\", "
      "str reset=\"subtract\", bool return_mem=False, str dynamics=\"leaky\", float tau=2.0, "
      "float v_reset=0.0, bool detach_reset=True) -> "
      "(Tensor spikes, Tensor v_final, Tensor act_cnt, Tensor act_idx, Tensor act_sg, "
      "Tensor act_rg, Tensor rst_bits, Tensor mem, Tensor stats)");
  // Its backward: dL/dcurrent [T, B, N] = G (times input_scale), the reverse-time trace
  // G[t] = trace_decay(alpha, R[t+1]) G[t+1] + delta[t] (+ grad_mem[t]), delta = grad_spikes * sg
  // at the saved entries (all of them in dense mode: act_sg [T, B, N]); dv_init [B, N] (or empty).
  // SpikingJelly dynamics: G[t] = (1 - S[t] (hard) + rg[t]) * alpha * G[t+1] + delta[t], the last
  // step's carry being grad_v_final; input_scale = 1/tau for "sj_lif_decay_input".
  m.def(
      "lif_neuron_backward(Tensor grad_spikes, Tensor? grad_v_final, Tensor? grad_mem, "
      "Tensor act_cnt, Tensor act_idx, Tensor act_sg, Tensor? act_rg, Tensor? rst_bits, "
      "float alpha, bool sparse, bool need_dv, str dynamics=\"leaky\", float input_scale=1.0) -> "
      "(Tensor grad_current, Tensor dv_init)");
  // The neuron op with tensor parameters and a synaptic current (DESIGN.md §3c), leaky dynamics:
  // alpha, threshold [N] per neuron (the Python layer broadcasts them), alpha_syn [N] or None (no
  // synaptic current): syn[t] = alpha_syn*syn[t-1] + current[t], and the membrane integrates syn[t].
  // syn_init [B, N] or None (0); syn_final [B, N] (empty without alpha_syn). With need_d*, the
  // forward-mode traces P = dV/dalpha, Q = -dV/dthreshold, U = dV/dalpha_syn (lif_math.h) are
  // kept: act_p, act_q, act_u one value per active entry (in act_idx's order), or [T, B, N] when
  // dense_traces (backward "dense", or return_mem); each empty when its parameter needs none.
  // tan_last [4, B, N] holds P, Q, R = dsyn/dalpha_syn, U after the last step (empty when no
  // parameter needs a gradient). The other outputs are lif_neuron_forward's.
  m.def(
      "lif_neuron_param_forward(Tensor current, Tensor? v_init, Tensor? s_init, Tensor? syn_init, "
      "Tensor alpha, Tensor threshold, Tensor? alpha_syn, float b_th, float slope, bool sparse, "
      "str surrogate, str reset, bool return_mem, bool need_dalpha, bool need_dthreshold, "
      "bool need_dalpha_syn) -> (Tensor spikes, Tensor v_final, Tensor syn_final, Tensor act_cnt, "
      "Tensor act_idx, Tensor act_sg, Tensor act_p, Tensor act_q, Tensor act_u, Tensor tan_last, "
      "Tensor rst_bits, Tensor mem, Tensor stats)");
  // The same neuron fed by the current x W^T + b of a Linear layer, fused (the tensor-parameter
  // lif_layer; CPU only): the current of each row is summed from x's events (or read from one
  // GEMM when x is dense) as lif_forward does, never stored. Outputs: lif_neuron_param_forward's
  // (stats[2] = nonzeros of x) and x's events ev_cnt, ev_idx, ev_val as lif_forward returns
  // them (what the backward keeps of x).
  m.def(
      "lif_param_forward(Tensor x, Tensor weight, Tensor? bias, Tensor? v_init, Tensor? s_init, "
      "Tensor? syn_init, Tensor alpha, Tensor threshold, Tensor? alpha_syn, float b_th, "
      "float slope, bool sparse, str surrogate, str reset, bool return_mem, bool need_dalpha, "
      "bool need_dthreshold, bool need_dalpha_syn) -> (Tensor spikes, Tensor v_final, "
      "Tensor syn_final, Tensor act_cnt, Tensor act_idx, Tensor act_sg, Tensor act_p, "
      "Tensor act_q, Tensor act_u, Tensor tan_last, Tensor rst_bits, Tensor mem, Tensor stats, "
      "Tensor ev_cnt, Tensor ev_idx, Tensor ev_val)");
  // Its backward: grad_current = G_I (G_I[t] = G_V[t] + alpha_syn*G_I[t+1]; G_I = G_V without a
  // synaptic current), dv_init, dsyn_init [B, N] (or empty), and per batch element the parameter
  // gradients d_alpha, d_threshold, d_alpha_syn [B, N] (or empty): the sum over the entries where
  // a gradient reaches V of g*P, -g*Q (and -delta through the spike), g*U, plus
  // grad_syn_final*R at the last step.
  m.def(
      "lif_neuron_param_backward(Tensor grad_spikes, Tensor? grad_v_final, "
      "Tensor? grad_syn_final, Tensor? grad_mem, Tensor act_cnt, Tensor act_idx, Tensor act_sg, "
      "Tensor act_p, Tensor act_q, Tensor act_u, Tensor tan_last, Tensor? rst_bits, Tensor alpha, "
      "Tensor? alpha_syn, bool sparse, bool dense_traces, bool need_dv, bool need_dsyn, "
      "bool need_dalpha, bool need_dthreshold, bool need_dalpha_syn) -> (Tensor grad_current, "
      "Tensor dv_init, Tensor dsyn_init, Tensor d_alpha, Tensor d_threshold, Tensor d_alpha_syn)");
  // The fused layer's backward (lif_param_forward's; CPU only): lif_neuron_param_backward's
  // arguments for N_out neurons, then li_readout_backward's (alpha = 0, reduce "none") for its
  // dL/dI, which the neuron's reverse walk hands to the tiled walk row by row, never stored.
  // dx is computed on the producer's active set only (need_dx needs prev_cnt, prev_idx; zeros
  // elsewhere). Outputs as the two ops give them (empty where not asked).
  m.def(
      "lif_param_backward(Tensor grad_spikes, Tensor? grad_v_final, Tensor? grad_syn_final, "
      "Tensor? grad_mem, Tensor act_cnt, Tensor act_idx, Tensor act_sg, Tensor act_p, "
      "Tensor act_q, Tensor act_u, Tensor tan_last, Tensor? rst_bits, Tensor alpha, "
      "Tensor? alpha_syn, Tensor weight, Tensor ev_cnt, Tensor ev_idx, Tensor ev_val, "
      "Tensor? prev_cnt, Tensor? prev_idx, bool sparse, bool dense_traces, bool need_dx, "
      "bool need_dw, bool need_db, bool need_dv, bool need_dsyn, bool need_dalpha, "
      "bool need_dthreshold, bool need_dalpha_syn) -> (Tensor dx, Tensor dweight, Tensor dbias, "
      "Tensor dv_init, Tensor dsyn_init, Tensor d_alpha, Tensor d_threshold, "
      "Tensor d_alpha_syn)");
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
  // The recurrent layer with per-neuron alpha, threshold [N] and the optional synaptic current
  // (alpha_syn [N]; syn[t] = alpha_syn*syn[t-1] + I[t], which V integrates in place of I[t]):
  // issue 18, CPU kernels only so far. The outputs of rlif_forward with syn_final [B, N] (empty
  // without alpha_syn) after v_final and, when need_dparams, the forward-mode traces
  // (lif_math.h) P = dV/dalpha, Q = -dV/dthreshold, U = dV/dalpha_syn after act_sg: one value
  // per active entry (in act_idx's order; dense mode [T, B, N]; act_u empty without alpha_syn)
  // and tan_last [4, B, N] = (P, Q, R = dsyn/dalpha_syn, U) after the last step.
  m.def(
      "rlif_param_forward(Tensor x, Tensor weight, Tensor rec_weight, Tensor? bias, "
      "Tensor? v_init, Tensor? s_init, Tensor? syn_init, Tensor? x_act_cnt, Tensor? x_act_idx, "
      "Tensor alpha, Tensor threshold, Tensor? alpha_syn, float b_th, float slope, bool sparse, "
      "str surrogate=\"fast_sigmoid\", str reset=\"subtract\", bool need_dparams=False) -> "
      "(Tensor spikes, Tensor v_final, Tensor syn_final, Tensor act_cnt, Tensor act_idx, "
      "Tensor act_sg, Tensor act_p, Tensor act_q, Tensor act_u, Tensor tan_last, Tensor ev_cnt, "
      "Tensor ev_idx, Tensor ev_val, Tensor spk_bits, Tensor stats)");
  // Their backwards: rlif_backward_sparse's / rlif_backward_dense's gradients, dsyn_init [B, N]
  // (need_dsyn) and, per batch element, d_alpha, d_threshold, d_alpha_syn [B, N] (need_dparams;
  // d_alpha_syn only with alpha_syn; else empty): the sums of delta*P, -delta*(Q + 1),
  // delta*U over the entries where delta is formed, plus grad_v_final*(P, -Q, U) and
  // grad_syn_final*R after the last step (docs/design.md, "Tensor parameters and the synaptic
  // current of the recurrent layer").
  m.def(
      "rlif_param_backward_sparse(Tensor grad_spikes, Tensor? grad_v_final, "
      "Tensor? grad_syn_final, Tensor weight, Tensor rec_weight, Tensor? s_init, Tensor act_cnt, "
      "Tensor act_idx, Tensor act_sg, Tensor act_p, Tensor act_q, Tensor act_u, Tensor tan_last, "
      "Tensor ev_cnt, Tensor ev_idx, Tensor ev_val, Tensor spk_bits, Tensor? prev_cnt, "
      "Tensor? prev_idx, Tensor alpha, Tensor? alpha_syn, str reset, bool need_dx, bool need_dw, "
      "bool need_drec, bool need_db, bool need_dv, bool need_ds, bool need_dsyn, "
      "bool need_dparams) -> (Tensor dx, Tensor dweight, Tensor drec_weight, Tensor dbias, "
      "Tensor dv_init, Tensor ds_init, Tensor dsyn_init, Tensor d_alpha, Tensor d_threshold, "
      "Tensor d_alpha_syn)");
  m.def(
      "rlif_param_backward_dense(Tensor grad_spikes, Tensor? grad_v_final, "
      "Tensor? grad_syn_final, Tensor x, Tensor weight, Tensor rec_weight, Tensor? s_init, "
      "Tensor spikes, Tensor sg, Tensor act_p, Tensor act_q, Tensor act_u, Tensor tan_last, "
      "Tensor alpha, Tensor? alpha_syn, str reset, bool need_dx, bool need_dw, bool need_drec, "
      "bool need_db, bool need_dv, bool need_ds, bool need_dsyn, bool need_dparams) -> "
      "(Tensor dx, Tensor dweight, Tensor drec_weight, Tensor dbias, Tensor dv_init, "
      "Tensor ds_init, Tensor dsyn_init, Tensor d_alpha, Tensor d_threshold, Tensor d_alpha_syn)");
  // Convolutions of spike sequences (issue 20; csrc/cpu/conv_cpu.cpp). Time is folded into the
  // batch: N = T*B samples, sample n = t*B + b. spike_pack: x [N, M] -> bits [N, ceil(M/32)] int32
  // (bit j%32 of word j/32 = x[n, j] != 0) and info int64 [2] = (nonzeros, entries not 0 or 1).
  m.def("spike_pack(Tensor x) -> (Tensor bits, Tensor info)");
  // conv2d of binary input given as bits (in_shape = [C_in, H, W]) by events, then the bias and
  // pool ("none" | "max" | "avg", kernel = stride = pool_k, no padding): out [N, C_out, Hp, Wp],
  // pool_idx uint8 of out's shape (max: winner offset ky*pool_k + kx in its window), else empty.
  m.def(
      "spike_conv2d_forward(Tensor bits, Tensor weight, Tensor? bias, int[] in_shape, "
      "int[] stride, int[] padding, int[] dilation, int groups, str pool, int pool_k) -> "
      "(Tensor out, Tensor pool_idx)");
  // The pooling alone, of a dense conv output y [N, C, H, W] (the dense route), same outputs.
  m.def("conv_pool2d(Tensor y, str pool, int pool_k) -> (Tensor out, Tensor pool_idx)");
  // Its backward: grad [N, C, Hp, Wp] -> [N, C, h, w] (max: to the winners; avg: 1/k^2 each).
  m.def("conv_unpool2d(Tensor grad, Tensor pool_idx, str pool, int pool_k, int h, int w) -> Tensor");
  // Backward of conv -> pool from the pooled gradient: dW, db by the input's events (bits), dx
  // only at the producer's active set (prev_cnt [B*T] / prev_idx over rows b*T + t, num_steps =
  // T), grad_conv = the unpooled gradient [N, C_out, Ho, Wo] (for a dense dx or dense-input dW).
  m.def(
      "spike_conv2d_backward(Tensor grad_out, Tensor pool_idx, Tensor? bits, Tensor weight, "
      "int[] in_shape, int[] stride, int[] padding, int[] dilation, int groups, str pool, "
      "int pool_k, Tensor? prev_cnt, Tensor? prev_idx, int num_steps, bool need_dx, "
      "bool need_dw, bool need_db, bool need_grad_conv) -> (Tensor dx, Tensor dweight, "
      "Tensor dbias, Tensor grad_conv)");
}

}  // namespace sparsegrad
